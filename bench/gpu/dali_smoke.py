"""Does DALI import and run here? Its CPU operators on four images, no torch needed.

The dry run of the GPU machine's install (bench/gpu/README.md): under any Python with
numpy, with DALI and the wheels that bench/gpu/wheels.sh installs on its PYTHONPATH. The
operators of pipelines/dali.py are written out here rather than imported, since that module
imports torch, which the dry run's bare Python 3.12 does not have.
"""

import sys

import numpy as np
import nvidia.dali as dali
import optree
from nvidia.dali import fn, pipeline_def, types

print("python", sys.version.split()[0], "dali", dali.__version__, "optree from", optree.__file__)


@pipeline_def(batch_size=4, num_threads=1, device_id=None, exec_dynamic=True)
def pipe():
    # The operators of pipelines/dali.py: warp_affine by host-fed maps, then / 255.
    images = fn.external_source(name="images", device="cpu", layout="HWC")
    out = fn.warp_affine(
        images,
        matrix=fn.external_source(name="matrix"),
        size=(32, 32),
        inverse_map=True,
        interp_type=types.INTERP_NN,
        fill_value=0,
    )
    return out / types.Constant(255.0, dtype=types.FLOAT)


p = pipe(prefetch_queue_depth=1)
p.build()
x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
p.feed_input("images", x)
p.feed_input("matrix", np.tile(np.eye(2, 3, dtype=np.float32), (4, 1, 1)))  # identity maps
p.schedule_run()
(out,) = p.outputs()
y = np.asarray(out.as_tensor())
ok = np.allclose(y, x / 255.0)
print("identity warp gives x / 255:", ok, y.shape, y.dtype)
sys.exit(0 if ok else 1)
