# The image every Civic service runs from; docker-compose.yml picks the service by its command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app:/app/gen

WORKDIR /app
COPY . .

# Generated protobuf code is never committed (gen/ is ignored): build it here, with the same
# tools and versions the dev extra pins.
RUN pip install . "grpcio-tools>=1.85,<2" "mypy-protobuf>=5.1,<6" \
    && mkdir -p gen \
    && python -m grpc_tools.protoc -I proto --python_out=gen --grpc_python_out=gen \
        --mypy_out=gen --mypy_grpc_out=gen $(find proto -name '*.proto')

# Never run as root: a compromised service should not own the container.
RUN useradd --system --uid 10001 --no-create-home --home-dir /nonexistent civic
USER civic

# gRPC: registry, tickets, notices, ledger, gis (services.common.config.GRPC_PORTS).
EXPOSE 50051-50055

CMD ["python", "-m", "services.registry.main"]
