"""Requests in, tokens out: the engine (request lifecycle, the decode step), the HTTP server and
the OpenAI API on top of it. Imports control/ and below."""
