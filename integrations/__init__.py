"""Model-family adapters, importable as ``rtl_plugin.integrations.<family>``."""
