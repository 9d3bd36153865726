# Minimal image for now; the hardened multi-stage build (non-root, healthcheck) is tracked in issue 7.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
COPY config ./config
RUN pip install --no-cache-dir .
EXPOSE 8080 9090
ENTRYPOINT ["sidecar"]
CMD ["run", "--config", "/app/config/sidecar.yaml"]
