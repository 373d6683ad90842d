"""The package version, in a module of its own so that any layer may import it without the
package root (whose lazy API would otherwise pull the top layer into the bottom one)."""

__version__ = "0.1.0"
