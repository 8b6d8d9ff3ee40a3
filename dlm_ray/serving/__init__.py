"""Models out: the Ray Serve app and its OpenAI wire format, and the Ray Data batch-generation job."""
