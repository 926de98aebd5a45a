"""Django Channels' channel layer, served by a Herald server.

    CHANNEL_LAYERS = {"default": {"BACKEND": "herald_channels.HeraldChannelLayer",
                                  "CONFIG": {"url": "http://127.0.0.1:8080"}}}
"""

from .layer import HeraldChannelLayer, HeraldError, HeraldUnavailable

__all__ = ["HeraldChannelLayer", "HeraldError", "HeraldUnavailable"]
__version__ = "0.1.0"
