"""``lorakit serve``: one base model, many adapters, one OpenAI-compatible server (see ``app`` and ``engine``)."""
