FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY jobs jobs
COPY worker worker
COPY ops ops
RUN pip install --no-cache-dir torch==2.13.0 && pip install --no-cache-dir ".[worker,api]"
ENTRYPOINT []
CMD ["dreambatch", "--help"]
