"""Flows built on the layers below (demo, bench, pictures): they never call ``emseg.api``."""
