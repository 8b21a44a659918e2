# tutorgate gateway image: python:3.11-slim, runs as an unprivileged user.
#
#   docker build -t tutorgate:local .
#   docker run --rm -e TUTORGATE_ID_SECRET=... -v "$PWD/policies:/etc/tutorgate:ro" \
#       -p 8080:8080 tutorgate:local serve --upstream http://upstream:8000
#
# The build stage installs the project and its dependencies into a virtual
# environment; the runtime stage copies only that environment, so no build
# tooling, pip cache or source tree is left in the image.  (Plain
# Dockerfile syntax: no BuildKit needed, docker-compose v1 builds it too.)

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/tutorgate
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN /opt/tutorgate/bin/pip install .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/tutorgate/bin:$PATH
COPY --from=build /opt/tutorgate /opt/tutorgate
RUN groupadd --system --gid 10001 tutorgate \
 && useradd --system --uid 10001 --gid tutorgate --home-dir /nonexistent \
        --no-create-home --shell /usr/sbin/nologin tutorgate

# Defaults for a container: listen on all interfaces, policy from the mounted
# directory.  Every one can be overridden by the matching command-line option.
ENV TUTORGATE_POLICY=/etc/tutorgate/default.yaml \
    TUTORGATE_LISTEN=0.0.0.0:8080 \
    TUTORGATE_ADMIN_LISTEN=0.0.0.0:9100

USER 10001:10001
EXPOSE 8080 9100

# /healthz answers 200 once the gateway serves; the slim image has no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/healthz', timeout=3)"]

ENTRYPOINT ["tutorgate"]
CMD ["serve"]
