"""JSON Schemas (OpenAPI 3.1, i.e. JSON Schema 2020-12) of binserve's JSON bodies, named as the
document's components.

design: the routes validate their input by hand (the adapters know a model's inputs; the limits
are checked before anything is built), so these schemas describe rather than enforce. They are
kept honest three ways: a test checks the field sets of the OpenAI and seed routes against the
routes' own constants (an accepted field cannot be missing here), replies in the tests are
validated against them, and Schemathesis sends schema-shaped requests to a real server and checks every reply
against its schema.
"""

from __future__ import annotations

from binserve.scheduling.sampling_bounds import MAX_STOP_CHARS, MAX_STOPS, MAX_TOP_LOGPROBS, schema

STRING_OR_LIST = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}}
IDS_OR_ROWS = {"oneOf": [IDS, {"type": "array", "items": IDS}]}
NUMBERS = {"type": "array", "items": {"oneOf": [{"type": "number"}, {"type": "array"}]}}
_STOP_STRING = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
STOP = {"oneOf": [_STOP_STRING, {"type": "array", "items": _STOP_STRING, "maxItems": MAX_STOPS}]}

NATIVE_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {
                "type": {"type": "string", "description": "machine-readable, e.g. payload_too_large"},
                "message": {"type": "string", "description": "what was wrong, naming the field or limit"},
            },
        }
    },
}
V2_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
OPENAI_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

NATIVE_REQUEST = {
    "type": "object",
    "description": "The model's inputs by name (GET /models lists each model's), plus fan-out and "
    "classifier options. One sample or a batch: the reply mirrors it.",
    "properties": {
        "texts": STRING_OR_LIST,
        "images": {
            "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}],
            "description": "image models: an encoded image (JPEG, PNG, WebP) or a list of them; in JSON as "
            "base64 or a data URL, in the binary formats as bytes",
        },
        "input_ids": IDS_OR_ROWS,
        "attention_mask": IDS_OR_ROWS,
        "models": {
            "type": "array",
            "items": {"type": "string"},
            "minItems": 1,
            "description": "fan-out: run these models on the same input (POST /infer only)",
        },
        "params": {
            "type": "object",
            "additionalProperties": {"type": "object"},
            "description": "fan-out: options per model name",
        },
        "top_k": {"type": "integer", "minimum": 1, "description": "classifiers: labels per row"},
        "threshold": {"type": "number", "description": "classifiers: labels scoring at least this"},
    },
    "additionalProperties": {"description": "another input the model declares (an array of its shape)"},
    "examples": [{"texts": ["binserve batches concurrent requests"]}],
}
NATIVE_REPLY = {
    "type": "object",
    "description": "The model's outputs by name (embeddings, logits, probabilities, labels, scores, "
    "...) and `status: \"ok\"` (the Flask card's clients check it); a fan-out nests one such object "
    "(without `status`) per model name.",
    "properties": {"status": {"const": "ok"}},
    "additionalProperties": {"oneOf": [{"type": "array"}, {"type": "object"}, {"type": "number"}]},
}

TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {
            "enum": [
                "BOOL",
                "UINT8",
                "UINT16",
                "UINT32",
                "UINT64",
                "INT8",
                "INT16",
                "INT32",
                "INT64",
                "FP16",
                "FP32",
                "FP64",
                "BF16",
                "BYTES",
            ]
        },  # fmt: skip
        "parameters": {
            "type": "object",
            "properties": {"binary_data_size": {"type": "integer", "minimum": 0}, "binary_data": {"type": "boolean"}},
        },
        "data": {"type": "array", "description": "row-major elements, flat or nested (absent with binary data)"},
    },
}
V2_REQUEST = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "inputs": {"type": "array", "items": TENSOR, "minItems": 1},
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
            },
        },  # fmt: skip
        "parameters": {
            "type": "object",
            "properties": {
                "binary_data_output": {"type": "boolean"},
                "timeout": {"type": "integer", "minimum": 0, "description": "microseconds"},
            },
        },
    },
}
V2_REPLY = {
    "type": "object",
    "required": ["model_name", "outputs"],
    "properties": {
        "model_name": {"type": "string"},
        "model_version": {"type": "string"},
        "id": {"type": "string"},
        "outputs": {"type": "array", "items": TENSOR},
    },
}
V2_METADATA = {
    "type": "object",
    "required": ["name", "inputs", "outputs"],
    "properties": {
        "name": {"type": "string"},
        "versions": {"type": "array", "items": {"type": "string"}},
        "platform": {"type": "string"},
        "inputs": {"type": "array", "items": {"type": "object"}},
        "outputs": {"type": "array", "items": {"type": "object"}},
    },
}
V2_SERVER = {
    "type": "object",
    "required": ["name", "version", "extensions"],
    "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                   "extensions": {"type": "array", "items": {"type": "string"}}},
}  # fmt: skip

_EMBEDDINGS_FIELDS = {
    "model": {"type": "string"},
    "input": {
        "oneOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}},
            IDS,
            {"type": "array", "items": IDS},
        ]
    },  # fmt: skip
    "encoding_format": {"enum": ["float", "base64"]},
    "dimensions": {"type": "integer", "description": "only the model's own width"},
    "user": {"type": "string"},
}
OPENAI_EMBEDDINGS_REQUEST = {
    "type": "object",
    "required": ["model", "input"],
    "properties": _EMBEDDINGS_FIELDS,
    "additionalProperties": False,
    "examples": [{"model": "minilm", "input": "binserve speaks OpenAI"}],
}
OPENAI_EMBEDDINGS_REPLY = {
    "type": "object",
    "required": ["object", "data", "model", "usage"],
    "properties": {
        "object": {"const": "list"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["object", "index", "embedding"],
                "properties": {
                    "object": {"const": "embedding"},
                    "index": {"type": "integer"},
                    "embedding": {"oneOf": [{"type": "array", "items": {"type": "number"}}, {"type": "string"}]},
                },
            },
        },
        "model": {"type": "string"},
        "usage": {"type": "object", "properties": {"prompt_tokens": {"type": "integer"},
                                                   "total_tokens": {"type": "integer"}}},
    },
}  # fmt: skip
OPENAI_MODEL = {
    "type": "object",
    "required": ["id", "object"],
    "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                   "owned_by": {"type": "string"}},
}  # fmt: skip
OPENAI_MODELS = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": OPENAI_MODEL}},
}

# the ranges are the adapter's own (binserve/scheduling/sampling_bounds.py); max_tokens is max_new_tokens
_BOUNDED = {"temperature", "top_p", "top_k", "seed", "repetition_penalty"}
_SAMPLING_BOUNDS = {"max_tokens": schema("max_new_tokens"), **{k: schema(k) for k in sorted(_BOUNDED)}}
_SAMPLING_COMMON = {
    "model": {"type": "string"},
    **_SAMPLING_BOUNDS,
    "stop": STOP,
    "stream": {"type": "boolean", "description": "server-sent events, one chunk per batch of tokens"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "n": {"type": "integer", "minimum": 1, "maximum": 16},
    "user": {"type": "string"},
    "presence_penalty": schema("presence_penalty"),
    "frequency_penalty": schema("frequency_penalty"),
}
MESSAGES = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "required": ["role", "content"],
        "properties": {"role": {"enum": ["system", "user", "assistant"]}, "content": {"type": "string"}},
    },
}
_COMPLETIONS_FIELDS = {
    **_SAMPLING_COMMON,
    "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 1}, IDS]},
    "logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_TOP_LOGPROBS},
    "echo": {"const": False},
}
_CHAT_FIELDS = {
    **_SAMPLING_COMMON,
    "messages": MESSAGES,
    "max_completion_tokens": {"type": "integer", "minimum": 1},
    "logprobs": {"type": ["boolean", "null"]},
    "top_logprobs": schema("logprobs"),
}
OPENAI_COMPLETIONS_REQUEST = {
    "type": "object",
    "required": ["model", "prompt"],
    "properties": _COMPLETIONS_FIELDS,
    "additionalProperties": False,
}
OPENAI_CHAT_REQUEST = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": _CHAT_FIELDS,
    "additionalProperties": False,
}
_USAGE = {"type": "object", "properties": {k: {"type": "integer"} for k in
                                           ("prompt_tokens", "completion_tokens", "total_tokens")}}  # fmt: skip


def _openai_reply(kind: str, choice: dict) -> dict:
    """A completions or chat reply: the same envelope, its `object` and the choice's own fields."""
    common = {"index": {"type": "integer"}, "finish_reason": {"type": ["string", "null"]},
              "logprobs": {"type": ["object", "null"]}}  # fmt: skip
    return {
        "type": "object",
        "required": ["id", "object", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": kind},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": {"type": "object", "properties": {**common, **choice}}},
            "usage": _USAGE,
        },
    }


OPENAI_COMPLETIONS_REPLY = _openai_reply("text_completion", {"text": {"type": "string"}})
OPENAI_CHAT_REPLY = _openai_reply(
    "chat.completion",
    {"message": {"type": "object", "properties": {"role": {"type": "string"}, "content": {"type": "string"}}}},
)

_SEED_SAMPLING = {
    "model": {"type": "string"},
    **_SAMPLING_BOUNDS,
    "stop_sequences": {"type": "array", "items": _STOP_STRING, "maxItems": MAX_STOPS},
    "stream": {"type": "boolean"},
    "metadata": {"type": "object", "description": "echoed back in the reply's metadata, not used"},
}
_SEED_GENERATE_FIELDS = {**_SEED_SAMPLING, "prompt": {"type": "string"}}
_SEED_CHAT_FIELDS = {**_SEED_SAMPLING, "messages": MESSAGES}
SEED_GENERATE_REQUEST = {"type": "object", "required": ["prompt"], "properties": _SEED_GENERATE_FIELDS,
                         "additionalProperties": False}  # fmt: skip
SEED_CHAT_REQUEST = {"type": "object", "required": ["messages"], "properties": _SEED_CHAT_FIELDS,
                     "additionalProperties": False}  # fmt: skip
_SEED_COMMON = {
    "finish_reason": {"enum": ["stop", "length", "cancelled", "deadline"]},
    "generation_time": {"type": "number", "description": "seconds"},
    "metadata": {"type": "object", "description": "the request's metadata, plus model_name and backend (the engine)",
                 "properties": {"model_name": {"type": "string"}, "backend": {"type": ["string", "null"]}}},
    "request_id": {"type": "string"},
    "tokens_generated": {"type": "integer", "minimum": 0},
}
SEED_GENERATE_REPLY = {
    "type": "object",
    "required": ["text", "finish_reason", "tokens_generated"],
    "properties": {**_SEED_COMMON, "text": {"type": "string"}, "tokens_per_second": {"type": "number"}},
}
SEED_CHAT_REPLY = {
    "type": "object",
    "required": ["message", "finish_reason", "tokens_generated"],
    "properties": {**_SEED_COMMON, "message": {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"const": "assistant"}, "content": {"type": "string"}}}},
}  # fmt: skip
SEED_STATS = {
    "type": "object",
    "required": ["total_requests", "total_tokens_generated", "uptime_seconds", "request_count", "uptime"],
    "properties": {
        **{k: {"type": "number", "minimum": 0} for k in (
            "average_tokens_per_request", "average_tokens_per_second", "total_inference_time", "total_requests",
            "total_tokens_generated", "uptime_seconds", "request_count", "avg_tokens_per_request",
            "avg_time_per_request", "avg_tokens_per_second")},
        "is_loaded": {"type": "boolean"},
        "is_ready": {"type": "boolean"},
        "backend_type": {"type": ["string", "null"], "description": "the engine of the generative model"},
        "uptime": {"type": "string", "description": "e.g. \"2 days, 14 hours, 32 minutes\""},
        "classify": {"type": "object", "description": "POST /classify: requests, texts, and per capability its "
                                                      "executions and texts (fewer executions than requests: "
                                                      "batching)"},
    },
}  # fmt: skip
_MODEL_STATS = {
    "type": "object",
    "properties": {"total_requests": {"type": "integer", "minimum": 0},
                   "total_batches": {"type": "integer", "minimum": 0},
                   "avg_batch_size": {"type": "number"}, "avg_latency": {"type": "number", "description": "seconds"},
                   "throughput": {"type": "number", "description": "samples/s: avg_batch_size / avg_latency"}},
}  # fmt: skip
HEALTH = {
    "type": "object",
    "required": ["status", "is_ready", "model_loaded", "models", "models_loaded", "stats"],
    "properties": {
        "status": {"type": "string", "description": "\"healthy\" when ready; else draining, failed or loading, naming "
                                                    "the model"},
        "is_loaded": {"type": "boolean"}, "is_ready": {"type": "boolean"},
        "backend_type": {"type": ["string", "null"], "description": "the engine of the default model's small batches"},
        "model_loaded": {"type": "boolean"}, "tokenizer_loaded": {"type": "boolean"},
        "gpu_available": {"type": "boolean"}, "gpu_count": {"type": "integer", "minimum": 0},
        "gpu_memory": {"type": ["object", "null"]}, "gpu_memory_bytes": {"type": ["integer", "null"]},
        "models": {"type": "array", "items": {"type": "string"}},
        "models_loaded": {"type": "array", "items": {"type": "string"}},
        "default_model": {"type": ["string", "null"]},
        "stats": {"type": "object", "additionalProperties": _MODEL_STATS},
    },
}  # fmt: skip
MODEL_INFO = {
    "type": "object",
    "required": ["model_type", "device", "parameters"],
    "properties": {"model_type": {"type": ["string", "null"]}, "device": {"type": ["string", "null"]},
                   "parameters": {"type": ["integer", "null"]}, "name": {"type": "string"},
                   "version": {"type": "string"}},
}  # fmt: skip
MODEL_INFO_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}

_TEXTS = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]}
PREDICT_REQUEST = {
    "oneOf": [
        {"type": "object", "required": ["texts"], "additionalProperties": False,
         "description": "the encoder server's: a text classifier (model_name, else the default)",
         "properties": {"texts": _TEXTS, "model_name": {"type": "string"},
                        "max_length": {"type": "integer", "minimum": 1, "description": "tokens per text, cut"}}},
        {"type": "object", "required": ["image"], "additionalProperties": False,
         "description": "LitServe's: an image classifier (the default model, else the first that takes images)",
         "properties": {"image": {"type": "string", "description": "one image, base64 (or a data URL)"},
                        "top_k": {"type": "integer", "minimum": 1}}},
    ]
}  # fmt: skip
_PREDICTION = {
    "type": "object",
    "required": ["prediction", "probabilities", "text"],
    "properties": {"prediction": {"type": "integer", "minimum": 0, "description": "the argmax label index"},
                   "probabilities": {"type": "array", "items": {"type": "number"}}, "text": {"type": "string"}},
}  # fmt: skip
PREDICT_REPLY = {
    "oneOf": [
        {"type": "object", "required": ["request_id", "results", "processing_time", "model_used"],
         "properties": {"request_id": {"type": "string"},
                        "results": {"oneOf": [_PREDICTION, {"type": "array", "items": _PREDICTION}],
                                    "description": "one object for one string, a list for a list"},
                        "processing_time": {"type": "number", "description": "seconds"},
                        "model_used": {"type": "string"}}},
        {"type": "object", "required": ["predictions"],
         "properties": {"predictions": {"type": "array", "items": {
             "type": "object", "required": ["label", "probability"],
             "properties": {"label": {"type": "string"}, "probability": {"type": "number"}}}},
             "model_used": {"type": "string"}}},
    ]
}  # fmt: skip

CLASSIFY_REQUEST = {
    "type": "object",
    "required": ["texts"],
    "additionalProperties": False,
    "properties": {
        "texts": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]},
        "capabilities": {"type": "array", "minItems": 1, "description": "default: [\"classification\"]",
                         "items": {"enum": ["classification", "recommendations", "alerts"]}},
    },
}  # fmt: skip
CLASSIFY_REPLY = {
    "type": "object",
    "required": ["request_id", "results", "processing_time"],
    "properties": {
        "request_id": {"type": "string"},
        "processing_time": {"type": "number", "description": "seconds"},
        "results": {"type": "array", "description": "one per text, in order, with the capabilities asked",
                    "items": {"type": "object", "required": ["text"], "properties": {
                        "text": {"type": "string"},
                        "classification": {"type": "object", "properties": {"topics": {"type": "array", "items": {
                            "type": "object", "properties": {"name": {"type": "string"},
                                                             "score": {"type": "number"}}}}}},
                        "recommendations": {"type": "object", "properties": {
                            "text": {"type": "string"}, "topics": {"type": "array", "items": {"type": "string"}}}},
                        "alerts": {"type": "array", "items": {"type": "object"}}}}},
    },
}  # fmt: skip

UPDATE_MODEL_REQUEST = {
    "type": "object",
    "properties": {
        "model": {"type": "string"},
        "version": {"type": "string", "description": "a version already in the repository"},
        "path": {"type": "string", "description": "a directory under import_root, imported as the next version"},
        "adapter": {"type": "string"},
        "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
    },
}
CONTROL_MODEL_REQUEST = {
    "type": "object",
    "properties": {
        "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
        "parameters": {"type": "object", "description": "Triton's load parameters; accepted and not used"},
    },
}
OBJECT = {"type": "object"}
