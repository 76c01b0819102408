# DicomProxy gateway image. Reuses scripts/install.sh, so the image has exactly the packages
# the tests run against (Debian bookworm: orthanc, dcmtk, nginx + lua, chromium, node).
#   docker build -t dicomproxy .
#   docker run -p 8080:8080 -p 11112:11112 --ulimit nofile=65536:65536 \
#       -e DICOMPROXY__Upstream__Url=http://pacs:8042 dicomproxy
FROM debian:bookworm-slim

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1

WORKDIR /app
COPY . /app
RUN bash scripts/install.sh \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /root/.cache /root/.npm

# The defaults listen on loopback only (Urls http://127.0.0.1:8080, Dicom:Host 127.0.0.1); inside a
# container that would be unreachable, so both listen on all interfaces here. Publish the ports
# only on a trusted network and set Dicom:AllowedCallingAets and Authentication:Users.
# Secrets as files (Docker secrets): -e DICOMPROXY__Smtp__PasswordFile=/run/secrets/smtp
# A site file layered on top: -e DICOMPROXY_ENVIRONMENT=Production reads appsettings.Production.json.
# HTTPS: mount the PKCS#12 bundle as /app/certificate.pfx (its default place) and add
#   -e "DICOMPROXY__Urls=http://0.0.0.0:8080;https://0.0.0.0:8443" -p 8443:8443
#   -e DICOMPROXY__Https__Pkcs12PasswordFile=/run/secrets/pfx-password (README: HTTPS).
ENV DICOMPROXY__Urls=http://0.0.0.0:8080 \
    DICOMPROXY__Dicom__Host=0.0.0.0

EXPOSE 8080 11112

# `serve` reads /app/appsettings.json, then appsettings.$DICOMPROXY_ENVIRONMENT.json, then DICOMPROXY__*
# variables; `dicomproxy config` prints the result (secrets as ***).
CMD ["/app/.venv/bin/dicomproxy", "serve"]
