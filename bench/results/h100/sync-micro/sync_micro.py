"""Host cost of reading a layer's routing back (a [T, K] int64 tensor made by the GPU), per way, on this host:
pageable blocking .to("cpu") (the runtime's way) vs a pinned staging buffer + event, each right after a small kernel."""
import json, time, sys
import torch
dev = torch.device("cuda")
out = {}
for rows in (1, 8, 64):
    src = torch.zeros((rows, 8), dtype=torch.int64, device=dev)
    pinned = torch.empty((rows, 8), dtype=torch.int64, pin_memory=True)
    event = torch.cuda.Event()
    def pageable():
        src.add_(1)
        return src.to("cpu").numpy()
    def staged():
        src.add_(1)
        pinned.copy_(src, non_blocking=True)
        event.record()
        event.synchronize()
        return pinned.numpy()
    def staged_copy_only():
        src.add_(1)
        torch.cuda.synchronize()
        return src.to("cpu").numpy()
    for name, fn in (("pageable_to_cpu", pageable), ("pinned_event", staged), ("sync_then_to_cpu", staged_copy_only)):
        for _ in range(200):
            fn()
        samples = []
        for _ in range(5):
            torch.cuda.synchronize()
            began = time.perf_counter()
            for _ in range(2000):
                fn()
            samples.append((time.perf_counter() - began) / 2000 * 1e6)
        out[f"{name}@{rows}"] = round(sorted(samples)[2], 1)
    ev = torch.cuda.Event(); s2 = torch.cuda.Stream()
    def record(): ev.record()
    def wait(): s2.wait_event(ev)
    def query(): ev.query()
    def new_event(): torch.cuda.Event().record()
    for name, fn in (("event_record", record), ("stream_wait_event", wait), ("event_query", query), ("new_event_record", new_event)):
        if rows != 1: break
        torch.cuda.synchronize(); began = time.perf_counter()
        for _ in range(20000): fn()
        out[name] = round((time.perf_counter() - began) / 20000 * 1e6, 2)
print(json.dumps(out))
