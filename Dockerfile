# modelservice: the gRPC service plus the Envoy gateway (REST) in one image.
# Production points it at MongoDB, S3 and a Ray cluster through MODELSERVICE_* variables;
# with none set it runs everything embedded (nx-27017, a local archive directory, a local
# Ray head), as `scripts/run.sh` does.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MODELSERVICE_GRPC_HOST=0.0.0.0 \
    MODELSERVICE_HTTP_HOST=0.0.0.0 \
    MODELSERVICE_DATA_DIR=/var/lib/modelservice

WORKDIR /app

# The CPU build of torch first, from PyTorch's CPU index: the default index resolves to a
# multi-GB CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

COPY pyproject.toml README.md ./
COPY server ./server
COPY modelservice_sdk ./modelservice_sdk
COPY generated ./generated
COPY envoy ./envoy
# Editable: envoy/ and generated/ are read from the source tree at run time.
RUN pip install --editable .

RUN useradd --system --home /var/lib/modelservice modelservice \
    && mkdir -p /var/lib/modelservice && chown modelservice /var/lib/modelservice
USER modelservice

# 8080: REST and gRPC through Envoy; 50051: gRPC straight to the service.
EXPOSE 8080 50051
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; c = grpc.insecure_channel('127.0.0.1:50051'); sys.exit(0 if g.HealthStub(c).Check(h.HealthCheckRequest(), timeout=2).status == 1 else 1)"
STOPSIGNAL SIGTERM
CMD ["python", "-m", "server"]
