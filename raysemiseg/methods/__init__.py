"""Methods: the registry is filled by importing each method package."""

from raysemiseg.methods.base import METHODS, Batch, Method, get_method, register

__all__ = ["METHODS", "Batch", "Method", "get_method", "register"]
