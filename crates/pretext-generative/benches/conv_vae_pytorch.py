# PyTorch throughput of the default conv VAE (same sizes, Adam 1e-3, batch 64,
# continuous BCE + KL), fp32 on CPU: full training steps on real Fashion-MNIST
# batches held in memory. Prints images/s.
#   conv_vae_pytorch.py IMAGES.idx.gz STEPS [cl|nchw] [D1 D2]
# D1 D2: the decoder's own channels (model.dec_channels), default 32 128.
import sys, time, gzip, struct
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
torch.manual_seed(0)
def idx(path):
    data = open(path, 'rb').read()
    if path.endswith('.gz'): data = gzip.decompress(data)
    n = struct.unpack('>I', data[4:8])[0]
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, 1, 28, 28)
x = torch.from_numpy(idx(sys.argv[1]).astype(np.float32) / 255.0)
channels_last = len(sys.argv) > 3 and sys.argv[3] == 'cl'
d1, d2 = (int(sys.argv[4]), int(sys.argv[5])) if len(sys.argv) > 5 else (32, 128)
class ConvVAE(nn.Module):
    def __init__(self, c=1, s=28, c1=32, c2=128, d1=32, d2=128, z=64):
        super().__init__()
        self.d2, self.s = d2, s
        self.enc = nn.Sequential(nn.Conv2d(c, c1, 4, 2, 1), nn.ReLU(), nn.Conv2d(c1, c2, 4, 2, 1), nn.ReLU())
        flat = c2 * (s // 4) ** 2
        self.mu = nn.Linear(flat, z); self.logvar = nn.Linear(flat, z)
        self.dec_fc = nn.Sequential(nn.Linear(z, d2 * (s // 4) ** 2), nn.ReLU())
        self.dec = nn.Sequential(nn.ConvTranspose2d(d2, d1, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(d1, c, 4, 2, 1))
    def forward(self, x):
        h = self.enc(x).flatten(1)
        mu, lv = self.mu(h), self.logvar(h)
        z = mu + torch.randn_like(mu) * (0.5 * lv).exp()
        logits = self.dec(self.dec_fc(z).view(-1, self.d2, self.s // 4, self.s // 4))
        rec = F.binary_cross_entropy_with_logits(logits, x, reduction='sum') / x.shape[0]
        kl = 0.5 * (mu.pow(2) + lv.exp() - 1 - lv).sum() / x.shape[0]
        return rec + kl
m = ConvVAE(d1=d1, d2=d2)
if channels_last: m = m.to(memory_format=torch.channels_last)
opt = torch.optim.Adam(m.parameters(), 1e-3)
B = 64; steps = int(sys.argv[2])
def step(i):
    xb = x[(i * B) % 59968:(i * B) % 59968 + B]
    if channels_last: xb = xb.contiguous(memory_format=torch.channels_last)
    opt.zero_grad(); loss = m(xb); loss.backward(); opt.step()
for i in range(20): step(i)
t = time.time()
for i in range(steps): step(i)
dt = time.time() - t
print(f"pytorch conv VAE batch {B} decoder {d1}/{d2} threads {torch.get_num_threads()} cl={channels_last}: {steps*B/dt:.0f} images/s")
