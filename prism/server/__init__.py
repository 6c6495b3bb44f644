"""The OpenAI-compatible server: HTTP frontend, router, global scheduling across devices."""
