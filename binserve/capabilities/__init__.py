"""Document 000's capability server: `POST /classify` with classification, recommendations and
alerts over an LLM, each capability run once per batch over only the texts that need it."""
