"""relay-sidecar: forward a container's localhost ports to the Docker host."""

try:  # written by setuptools-scm when the package is built or installed, from git tags
    from relay._version import __version__ as __version__
except ImportError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"
