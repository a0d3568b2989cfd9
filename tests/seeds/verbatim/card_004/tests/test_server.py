import unittest
import numpy as np
from request_tools import send_inference_request


class TestServer(unittest.TestCase):
    SERVER_URL = 'http://127.0.0.1:50000/infer'

    def test_inference(self):
        data = {
            "state": np.random.randn(6).astype(np.float32),
            "image": np.random.randint(0, 255, (480, 640, 3), dtype=np.uint8)
        }
        result = send_inference_request(data, url=self.SERVER_URL)
        self.assertIn("status", result)
        self.assertEqual(result["status"], "ok")


if __name__ == '__main__':
    unittest.main()
