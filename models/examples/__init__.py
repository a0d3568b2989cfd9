"""Every example model the README calls, in one command, and the `--models` that serves them.

`python -m models.examples` (what `make examples` runs) writes, once, under `examples/`: the text
classifiers `topics` (single-label) and `toxicity` (multi-label) on MiniLM's encoder
(models/examples/classifier.py), the causal LM `lm` (a random Llama, models/examples/causal_lm.py),
the image classifier `pets` (a random ViT of ViT-Tiny's shape, models/examples/vision.py) and two
images to send it (`cat.jpg`, `dog.png`; drawn here, nothing downloaded); and under `incoming/`
(the examples server's import_root) `minilm-v2`, a second version of MiniLM for the hot-reload
example; and `examples/topics.json`, a capability server's configuration on `lm` (README: From the
LLM classification server: `python server.py --models "$(python -m models.examples --spec)"
--config examples/topics.json`). `python -m models.examples --spec` prints the `--models` value that serves MiniLM (the
default model) and all of them: what `make serve-examples` passes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

EXAMPLES, INCOMING = Path("examples"), Path("incoming")


def spec(root: Path = EXAMPLES) -> str:
    """The --models value: MiniLM first (the default model), then every example model."""
    from models.registry import default_minilm_path

    return ",".join([
        f"minilm=hf_encoder:{default_minilm_path()}",
        f"topics=hf_encoder:{root / 'topics'}",
        f"toxicity=hf_encoder:{root / 'toxicity'}",
        f"lm=hf_causal_lm:{root / 'lm'}",
        f"pets=hf_image:{root / 'pets'}",
    ])  # fmt: skip


#: the capability server's example configuration (binserve/capabilities/config.py), on the example LM
TOPICS_CONFIG = {
    "model": "lm",
    "topics": [
        {"name": "training", "description": "courses, workshops and learning"},
        {"name": "billing", "description": "invoices, payments and refunds"},
        {"name": "outage", "description": "systems down or slow"},
        {"name": "praise", "description": "thanks and compliments"},
    ],
    "recommendations": {"max_tokens": 16, "top_topics": 2},
    "alerts": {"rules": [{"topic": "outage", "threshold": 0.5, "message": "possible outage ({score:.2f})"}]},
}


def picture(h: int, w: int, seed: int) -> Image.Image:
    """A smooth gradient with a little noise: an image that compresses like a photo."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // w, yy * 255 // h, (xx * 3 + yy + seed * 40) % 256], -1)
    return Image.fromarray(((base + rng.integers(0, 24, (h, w, 3))) % 256).astype(np.uint8))


def write_examples(root: Path = EXAMPLES, incoming: Path = INCOMING) -> None:
    """Write whatever of the examples is not there yet (a directory that exists is kept)."""
    from models.examples.causal_lm import write_causal_lm
    from models.examples.classifier import TOPICS, TOXICITY, write_classifier
    from models.examples.vision import write_vision_model
    from models.registry import default_minilm_path

    steps = {
        root / "topics": lambda out: write_classifier(out, TOPICS),
        root / "toxicity": lambda out: write_classifier(out, TOXICITY, multi_label=True, seed=1),
        root / "lm": lambda out: write_causal_lm(out, layers=4, hidden=256),
        root / "pets": lambda out: write_vision_model(out, "classifier", "small"),
        incoming / "minilm-v2": lambda out: shutil.copytree(default_minilm_path(), out),
    }
    for out, write in steps.items():
        if out.exists():
            print(f"{out}: there already")
            continue
        partial = out.with_name(out.name + ".partial")  # a write cut short is never taken for a model
        shutil.rmtree(partial, ignore_errors=True)
        write(partial)
        partial.rename(out)
        print(f"{out}: written")
    root.mkdir(exist_ok=True)
    (root / "topics.json").write_text(json.dumps(TOPICS_CONFIG, indent=2) + "\n")
    picture(480, 640, 1).save(root / "cat.jpg", quality=90)
    picture(300, 400, 2).save(root / "dog.png")
    print(f"{root / 'topics.json'}, {root / 'cat.jpg'}, {root / 'dog.png'}: written")

