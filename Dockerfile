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

# Listen on all interfaces inside the container (the defaults are loopback-only).
ENV DICOMPROXY__Urls=http://0.0.0.0:8080 \
    DICOMPROXY__Dicom__Host=0.0.0.0

EXPOSE 8080 11112

# `serve` reads /app/appsettings.json when present; DICOMPROXY__* variables override it.
CMD ["/app/.venv/bin/dicomproxy", "serve"]
