import unittest
import numpy as np
from binary_protocol import dict_to_binary, binary_to_dict


class TestBinaryProtocol(unittest.TestCase):
    def test_simple_dict(self):
        data = {"key": "value", "number": 42}
        binary = dict_to_binary(data)
        restored = binary_to_dict(binary)
        self.assertEqual(data, restored)

    def test_numpy_array(self):
        data = {"array": np.random.randn(100, 100).astype(np.float32)}
        binary = dict_to_binary(data)
        restored = binary_to_dict(binary)
        np.testing.assert_array_equal(data["array"], restored["array"])


if __name__ == '__main__':
    unittest.main()
