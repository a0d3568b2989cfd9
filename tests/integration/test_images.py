"""Image models on a real Gunicorn server: every format, encoding and protocol against transformers
run directly, hostile images answered 4xx while good requests keep being served, and memory bounded."""

from __future__ import annotations

import base64
import io
import json
import pickle
import threading

import numpy as np
import pytest
import requests
import torch
import tritonclient.http as th
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

from binary_protocol import binary_to_dict, dict_to_binary
from models.examples.policy import write_model_dir as write_policy
from models.examples.vision import write_vision_model
from request_tools import send_inference_request
from tests.images import encode, hostile, photo, strip
from tests.serverproc import ServerProcess, status_kib

pytestmark = pytest.mark.slow
MAX_PROB_ERROR = 0.01  # the classifiers' accuracy gate: the server's plan may run another engine


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    pets = write_vision_model(root / "pets", "classifier", processor="bit")  # shortest edge + centre crop
    policy = write_policy(root / "policy")
    manifest = json.loads((policy / "manifest.json").read_text())
    manifest["inputs"]["image"]["image"] = {"resample": "bilinear"}
    (policy / "manifest.json").write_text(json.dumps(manifest))
    return pets, policy


@pytest.fixture(scope="module")
def srv(dirs):
    pets, policy = dirs
    with ServerProcess(workers=1, models=f"pets=hf_image:{pets},policy=torch_module:{policy}") as s:
        yield s


@pytest.fixture(scope="module")
def reference(dirs):
    """transformers' processor and model, run directly on Pillow's decoding of the same bytes."""
    processor = AutoImageProcessor.from_pretrained(dirs[0])
    model = AutoModelForImageClassification.from_pretrained(dirs[0]).eval()

    def probabilities(data: list[bytes]) -> np.ndarray:
        images = [Image.open(io.BytesIO(d)).convert("RGB") for d in data]
        with torch.no_grad():
            return model(**processor(images=images, return_tensors="pt")).logits.softmax(-1).numpy()

    return probabilities


IMAGES = [encode(photo(480, 640, 1), "JPEG"), encode(photo(240, 200, 2), "PNG"), encode(photo(90, 120, 3), "WEBP")]


def close(got, want) -> None:
    got = np.asarray(got)
    assert (got.argmax(-1) == want.argmax(-1)).all()
    np.testing.assert_allclose(got, want, atol=MAX_PROB_ERROR)


def test_every_format_and_encoding_through_every_protocol(srv, reference):
    want = reference(IMAGES)
    url = f"{srv.base_url}/infer/pets"
    b64 = [base64.b64encode(d).decode() for d in IMAGES]
    # native: the framed format (the client), plain pickle, JSON with base64 and with data URLs
    close(send_inference_request({"images": IMAGES}, url)["probabilities"], want)
    r = requests.post(url, data=pickle.dumps({"images": IMAGES}, protocol=5),
                      headers={"Content-Type": "application/octet-stream"})  # fmt: skip
    close(pickle.loads(r.content)["probabilities"], want)
    close(requests.post(url, json={"images": b64}).json()["probabilities"], want)
    urls = [f"data:image/jpeg;base64,{b}" for b in b64]
    reply = requests.post(url, json={"images": urls, "top_k": 2})
    close(reply.json()["probabilities"], want)
    assert [len(x) for x in reply.json()["labels"]] == [2, 2, 2]
    assert "decode-image;dur=" in reply.headers["Server-Timing"]
    # a raw image body, as curl --data-binary @cat.jpg sends it: one image, a JSON reply
    for data, media, row in ((IMAGES[0], "image/jpeg", 0), (IMAGES[1], "image/png", 1), (IMAGES[2], "image/webp", 2)):
        r = requests.post(url, data=data, headers={"Content-Type": media})
        assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
        close(r.json()["probabilities"], want[row])
    # V2 with tritonclient, unmodified: BYTES in the binary extension, and base64 strings in JSON
    client = th.InferenceServerClient(srv.base_url.removeprefix("http://"))
    try:
        for binary, values in ((True, IMAGES), (False, b64)):
            tensor = th.InferInput("images", [len(values)], "BYTES")
            tensor.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=binary)
            close(client.infer("pets", [tensor]).as_numpy("probabilities"), want)
        meta = client.get_model_metadata("pets")
        assert meta["inputs"] == [{"name": "images", "datatype": "BYTES", "shape": [-1]}]
    finally:
        client.close()


def test_a_camera_sends_jpegs_to_an_array_model_that_declares_an_image_input(srv):
    img, state = photo(240, 320, 7), np.linspace(-1, 1, 6, dtype=np.float32)
    jpeg = encode(img, "JPEG", quality=95)
    array = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB").resize((640, 480), Image.BILINEAR))
    url = f"{srv.base_url}/infer/policy"
    from_array = send_inference_request({"image": array, "state": state}, url)["action"]
    from_jpeg = requests.post(url, json={"image": base64.b64encode(jpeg).decode(), "state": state.tolist()})
    np.testing.assert_allclose(from_jpeg.json()["action"], from_array, atol=1e-5)


def test_hostile_images_get_their_4xx_while_good_requests_go_on_and_memory_stays_bounded(srv, reference):
    url = f"{srv.base_url}/infer/pets"
    (pid,) = srv.worker_pids()
    want = reference(IMAGES)
    body = dict_to_binary({"images": IMAGES})
    for _ in range(3):  # warm: the decode, resize and batch paths have run before the peak is read
        requests.post(url, data=body, headers={"Content-Type": "application/x-binserve"}).raise_for_status()
    peak_before = status_kib(pid, "VmHWM")
    stop, good, bad = threading.Event(), [], []

    def steady():  # good requests the whole time, batched with whatever else is queued
        with requests.Session() as s:
            while not stop.is_set():
                r = s.post(url, data=body, headers={"Content-Type": "application/x-binserve"})
                ok = r.status_code == 200 and np.allclose(binary_to_dict(r.content)["probabilities"], want,
                                                          atol=MAX_PROB_ERROR)  # fmt: skip
                (good if ok else bad).append(r.status_code)

    threads = [threading.Thread(target=steady) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        cases = hostile() | {"1 x 100000 strip (shortest-edge resize)": (strip(), 413)}
        good_b64 = base64.b64encode(IMAGES[0]).decode()
        for name, (data, status) in cases.items():
            raw = requests.post(url, data=data, headers={"Content-Type": "image/png"})  # the image alone
            in_json = requests.post(url, json={"images": [good_b64, base64.b64encode(data).decode()]})  # 2nd of 2
            for r, where in ((raw, "'images'"), (in_json, "'images'[1]")):
                assert r.status_code == status, (name, r.status_code, r.text)
                message = r.json()["error"]["message"]
                assert message.startswith(where) and "Traceback" not in message, (name, message)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert bad == [] and len(good) > 0
    assert srv.worker_pids() == [pid]  # no worker died
    grown_mib = (status_kib(pid, "VmHWM") - peak_before) / 1024
    assert grown_mib < 64, f"the worker's peak memory grew {grown_mib:.0f} MiB over the hostile images"
    assert requests.get(f"{srv.base_url}/readyz").status_code == 200
