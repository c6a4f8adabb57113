"""DataModules through the Trainer: device mode trains exactly as host mode.

Not under strict dtype promotion: optax's transformations rely on standard promotion.
"""

from contextlib import nullcontext

import numpy as np
import pytest
from helpers import make_mlp_experiment, params_of

import solstice
from solstice.datamodules import ColourMNIST, Digits


def _fit(on_device, **trainer_kw):
    dm = ColourMNIST(Digits(batch_size=32), on_device=on_device)
    trainer = solstice.Trainer(max_epochs=2, enable_progress_bar=False, **trainer_kw)
    other_devices = on_device and "devices" in trainer_kw
    with pytest.warns(RuntimeWarning, match="other devices") if other_devices else nullcontext():
        exp = trainer.fit(make_mlp_experiment(in_size=3 * 64, num_classes=10), dm)
    return params_of(exp), trainer.test(exp, dm)


@pytest.mark.parametrize(
    "trainer_kw",
    [
        {},
        # fused steps stack device batches
        {"steps_per_execution": 3, "log_every_n_steps": 3},
        # a Trainer on fewer devices than the data's mesh re-places the batches
        {"devices": 2},
    ],
)
def test_trainer_fits_identically_in_host_and_device_mode(trainer_kw):
    (host, host_test), (device, device_test) = _fit(False, **trainer_kw), _fit(True, **trainer_kw)
    for a, b in zip(host, device, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert host_test == device_test
