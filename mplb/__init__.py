"""mplb: a multi-process, pre-fork HTTP and WebSocket load balancer."""

__version__ = "0.1.0"
