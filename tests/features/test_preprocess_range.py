"""preprocess_image refuses values outside [0, 1] instead of clipping them silently (issue 11)."""

import numpy as np
import pytest

from normdino.errors import InputError
from normdino.features.backbone import preprocess_image


def test_out_of_range_arrays_are_refused_not_clipped():
    eight_bit_as_float = np.full((20, 20), 200.0, np.float32)  # clipping made it a white square
    with pytest.raises(InputError, match=r"values span 200 to 200 but must lie in \[0, 1\]"):
        preprocess_image(eight_bit_as_float, 28)
    with pytest.raises(InputError, match=r"span -0\.5 to"):
        preprocess_image(np.linspace(-0.5, 0.5, 400, dtype=np.float32).reshape(20, 20), 28)
    with pytest.raises(InputError, match="must lie in"):
        preprocess_image(np.full((20, 20), 1000, np.uint16), 28)


def test_in_range_arrays_and_uint8_are_accepted():
    unit = np.linspace(0, 1, 400, dtype=np.float32).reshape(20, 20)
    out = preprocess_image(unit, 28)
    assert out.shape == (3, 28, 28)
    np.testing.assert_allclose(preprocess_image((unit * 255).round().astype(np.uint8), 28),
                               preprocess_image((unit * 255).round() / np.float32(255), 28), atol=1e-6)
