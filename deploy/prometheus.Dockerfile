# Prometheus from Debian's package, for machines where prom/prometheus cannot be pulled
# (deploy/compose.local.yaml uses it). Build from the repository root:
#
#   docker build -f deploy/prometheus.Dockerfile -t petrel-prometheus:local deploy
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /prometheus && chown nobody:nogroup /prometheus
USER nobody
ENTRYPOINT ["/usr/bin/prometheus"]
