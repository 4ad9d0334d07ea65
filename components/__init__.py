"""Chimera components: the plugins, one folder per kind; each file registers itself."""
