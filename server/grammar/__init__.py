"""Constrained decoding: JSON Schema and tool calls as llama.cpp GBNF grammars."""
