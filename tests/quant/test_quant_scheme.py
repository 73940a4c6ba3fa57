"""Quantization schemes: stored form, error bounds, packing, validation."""

from __future__ import annotations

import pytest
import torch

from loopformer.errors import InputError
from loopformer.quant.scheme import (
    QuantScheme,
    error_bound,
    from_tensors,
    pack_int4,
    quantize,
    stored_shapes,
    unpack_int4,
)

GEN = torch.Generator().manual_seed(3)


def weights(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN) * 0.05


def awkward_rows() -> torch.Tensor:
    """Rows that stress the schemes: all zero, constant, a large offset with tiny spread, one outlier."""
    rows = weights(6, 100)
    rows[0] = 0.0
    rows[1] = 0.3
    rows[2] = 12.0 + weights(100) * 1e-3  # bf16 cannot hold the zero point exactly
    rows[3, 17] = 4.0
    return rows


@pytest.mark.parametrize("scheme", [QuantScheme(8), QuantScheme(4, 32), QuantScheme(4, 64), QuantScheme(4, 256)])
@pytest.mark.parametrize("shape", [(48, 64), (6, 100), (3, 16, 96)])
def test_dequantized_weights_are_within_half_a_step(scheme: QuantScheme, shape: tuple[int, ...]) -> None:
    w = awkward_rows() if shape == (6, 100) else weights(*shape)
    data = quantize(w, scheme)
    error = (data.dequantize() - w).abs()
    bound = error_bound(data)
    assert data.dequantize().shape == w.shape
    assert bool((error <= bound * (1 + 1e-5) + 1e-7).all()), float((error - bound).max())


def test_int8_is_symmetric_per_row_with_a_tight_scale() -> None:
    w = awkward_rows()
    data = quantize(w, QuantScheme(8))
    assert data.qweight.dtype == torch.int8 and data.scale.dtype == torch.float32
    torch.testing.assert_close(data.scale[1:], w[1:].abs().amax(dim=1) / 127)
    assert int(data.qweight.abs().amax(dim=1)[1:].min()) == 127  # every nonzero row reaches the full range
    assert torch.equal(data.dequantize()[0], torch.zeros(100))  # an all-zero row is exact


def test_int4_groups_use_the_full_range_with_a_near_minimal_step() -> None:
    w = weights(32, 128)
    data = quantize(w, QuantScheme(4, 32))
    groups = w.reshape(32, 4, 32)
    minimal = (groups.amax(-1) - groups.amin(-1)) / 15
    assert bool((data.scale.float() <= minimal * 1.02).all())  # bf16 rounding of the step costs at most ~1%
    q = unpack_int4(data.qweight).reshape(32, 4, 32)
    assert int(q.amin()) == 0 and int(q.amax()) == 15


def test_int4_padding_repeats_the_last_column() -> None:
    w = weights(4, 40)  # 40 columns: the second group of 32 has 8 real ones
    data = quantize(w, QuantScheme(4, 32))
    assert data.qweight.shape == (4, 32) and data.scale.shape == (4, 2)
    tail = w[:, 32:]
    lo, hi = tail.amin(1), tail.amax(1)
    step = data.scale[:, 1].float()
    zero = data.zero[:, 1].float()
    # the padded group's range is the real columns' range: the step fits it, not a range widened by zeros
    assert bool((step <= (hi - lo) / 15 * 1.02).all())
    assert bool((zero - 8 * step <= lo).all()) and bool((zero + 7 * step >= hi).all())


def test_pack_unpack_round_trip_and_nibble_order() -> None:
    q = torch.randint(0, 16, (5, 64), generator=GEN, dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (5, 32)
    assert torch.equal(unpack_int4(packed), q)
    assert int(packed[0, 0]) == int(q[0, 0]) + 16 * int(q[0, 1])


def test_stored_shapes_and_from_tensors_check_the_stored_form() -> None:
    data = quantize(weights(8, 70), QuantScheme(4, 32))
    assert stored_shapes((8, 70), 4, 32) == {"qweight": (8, 48), "scale": (8, 3), "zero": (8, 3)}
    rebuilt = from_tensors(data.tensors(), (8, 70), 4, 32, "w")
    assert torch.equal(rebuilt.dequantize(), data.dequantize())
    with pytest.raises(InputError, match=r"w\.scale is torch\.float32"):
        from_tensors({**data.tensors(), "scale": data.scale.float()}, (8, 70), 4, 32, "w")
    with pytest.raises(InputError, match="holds"):
        from_tensors({"qweight": data.qweight, "scale": data.scale}, (8, 70), 4, 32, "w")


def test_scheme_validation_and_round_trip() -> None:
    assert QuantScheme(4).group_size == 64 and QuantScheme(4).label == "int4-g64"
    assert QuantScheme.from_dict(QuantScheme(4, 128, False, True).to_dict()) == QuantScheme(4, 128, False, True)
    with pytest.raises(InputError, match="bits must be 8 or 4"):
        QuantScheme(3)
    with pytest.raises(InputError, match="no group size"):
        QuantScheme(8, 64)
    with pytest.raises(InputError, match="one of 32, 64, 128, 256"):
        QuantScheme(4, 48)
    with pytest.raises(InputError, match="malformed"):
        QuantScheme.from_dict({"bits": 4})
    with pytest.raises(InputError, match="at least 2 dimensions"):
        quantize(torch.ones(4), QuantScheme(8))
