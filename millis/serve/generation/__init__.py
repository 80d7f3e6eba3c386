"""The generation server: OpenAI-style completions and chat over one `millis.gen` engine."""
