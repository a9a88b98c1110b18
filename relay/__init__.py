"""relay-sidecar: forward a container's localhost ports to the Docker host."""

__version__ = "0.1.0"
