"""ztunnel-redirect: an nftables-native traffic redirection agent for Istio ambient mode."""

__all__ = ["__version__"]

__version__ = "0.1.0"
