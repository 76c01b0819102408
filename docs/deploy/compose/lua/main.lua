-- docs/deploy/compose/lua/main.lua: the singleton script of each replica (mounted read-only at
-- /app/lua). Every replica runs its own copy; what they share goes through Redis (Cluster:Redis):
-- the notification feed and its live stream, the task queue. ExtraConfig:Replica is set per
-- service in docker-compose.yml (DICOMPROXY__ExtraConfig__Replica) and in the Kubernetes manifest
-- (the pod's name).

local replica = Config["ExtraConfig:Replica"] or "?"

-- Say which replica answered: behind a round-robin load balancer that is what an operator (and
-- tests/e2e/test_tus_replicas.py) wants to know of a TUS PATCH. One header, no other work.
function onHttpResponse(response)
  response:AddHeader("X-Served-By", replica)
end

-- A finished upload: tell whoever watches the status page. The notification is raised here, on
-- the replica that received the last byte, and every replica's SSE stream
-- (/dicomproxy/notifications/stream) shows it. Nothing is returned, so the default import (a
-- cluster task any replica may run, once) sends the file to the PACS.
function onTusFileComplete(metadata)
  ShowNotification({
    Title = "Upload received",
    Body = string.format("%s (%s bytes) on %s", metadata["filename"] or metadata["fileId"], metadata["size"], replica),
  })
end
