# syntax=docker/dockerfile:1
# One image for every poolsadmin process: web (the default command, daphne), `manage.py
# worker`, `manage.py agent`, `manage.py migrate` (the migrate Job), `manage.py pool_token`.
# Build: docker build -t poolsadmin:TAG .   Kubernetes manifests: deploy/kubernetes/.
# The base is named in full in both stages (not through an ARG) so that the scanners and a
# reader see which image it is; the lock is compiled for this Python (make lock).

# --- build: the locked dependencies in a venv, the code, the collected static files ---------
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
# Exact versions with hashes (`make lock`): the image holds what CI tested, nothing newer.
COPY requirements/runtime.lock /tmp/runtime.lock
RUN /opt/venv/bin/pip install --require-hashes --no-deps -r /tmp/runtime.lock
WORKDIR /app
COPY manage.py pyproject.toml ./
COPY poolsadmin/ poolsadmin/
COPY templates/ templates/
COPY static/ static/
# Static files are collected here, once, into POOLSADMIN_VAR_DIR/staticfiles, and served by
# the web process. The settings need a SECRET_KEY with DEBUG off: a throwaway one, made and
# forgotten inside this step, never stored in a layer.
RUN POOLSADMIN_VAR_DIR=/app/var DEBUG=false \
    SECRET_KEY="$(/opt/venv/bin/python -c 'import secrets; print(secrets.token_hex(32))')" \
    /opt/venv/bin/python manage.py collectstatic --noinput --verbosity 0 \
    && /opt/venv/bin/python -m compileall -q /app/poolsadmin

# --- runtime: no compiler, no pip cache, a user without a shell or home ------------------------
FROM python:3.11-slim-bookworm AS runtime
ARG UID=10001
RUN groupadd --system --gid "${UID}" poolsadmin \
    && useradd --system --uid "${UID}" --gid poolsadmin --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin poolsadmin
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
# The code and static files stay root's (read-only to the app); var/ itself is the app's, for
# the worker's heartbeat file when no volume is mounted there (Kubernetes mounts an emptyDir).
RUN chown "${UID}:${UID}" /app/var
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    POOLSADMIN_VAR_DIR=/app/var \
    DEBUG=false
WORKDIR /app
USER ${UID}:${UID}
EXPOSE 8000
# checkov:skip=CKV_DOCKER_2: no HEALTHCHECK: one image runs web, worker and agent, and no one
# command is right for all three; Kubernetes ignores HEALTHCHECK and probes each Deployment
# itself (/healthz and /readyz for web, manage.py worker_health for the worker).
# --proxy-headers: the client address and scheme come from the ingress (X-Forwarded-For,
# X-Forwarded-Proto), not from the proxy's connection.
CMD ["daphne", "--proxy-headers", "-b", "0.0.0.0", "-p", "8000", "poolsadmin.asgi:application"]
