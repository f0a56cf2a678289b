"""Copy tiermem/ to .device/fine/ with extra host-phase laps in the prefetcher (a throwaway profile build)."""
import re, shutil
from pathlib import Path
dst = Path(".device/fine")
shutil.rmtree(dst, ignore_errors=True)
shutil.copytree("tiermem", dst / "tiermem")
p = dst / "tiermem/prefetch/prefetcher.py"
s = p.read_text()
def after(anchor, name, count=1, indent=None):
    global s
    assert s.count(anchor) == count, (anchor, s.count(anchor))
    indent = indent if indent is not None else re.match(r"\s*", anchor.splitlines()[-1]).group(0)
    s = s.replace(anchor, anchor + "\n" + indent + f"self.phases.lap({name!r})")
after("        self._reap()\n        num_layers = len(self.homes.layers)", "reap")
after("        objects = self.config.objects_per_layer", "pp_pre")
after("                                min_score=self.config.min_score)", "pp_admit", indent=" " * 8)
after("        free = self.cache.free_slots(group)", "pp_walk")
after("        order = self.cache.order(group) if free < len(scores) else []  # victims only when the free slots fall short", "pp_order")
after("        scores.update((k, values[index_of[k]]) for k in order if k in index_of)", "pp_vscores")
after("        plan = plan_prefetch(scores, order, self.cache.in_flight(group), self.cache.pinned(), free, budget, needed_now)", "pp_plan")
after("            self._layer_demands.clear()", "pp_gate")
after("                rows.append(self.cache.begin_load(key, tick))", "is_begin")
after("                        gate.wait_event(free)", "is_gate")
s = s.replace("                return engine.submit_direct(pairs, background=prefetch, after=gate)",
              "                self.phases.lap('sb_endpoints')\n                handle = engine.submit_direct(pairs, background=prefetch, after=gate)\n                self.phases.lap('sb_engine')\n                return handle")
after("        self._reap()\n        self._layer_demands.clear()", "dm_reap")
after("        group = self.cache.group_of(pending[0])\n        pinned, order = self.cache.pinned(), self.cache.order(group)", "dm_order")
after("        plan = plan_demand(chunk, order, self.cache.in_flight(group), pinned, self.cache.free_slots(group))", "dm_plan")
p.write_text(s)
r = dst / "tiermem/experts/runtime.py"
s = r.read_text()
after("            self.prefetcher.ready_all(wave)", "c_ready")
after("            rows = wave_rows(pairs, slot_of_expert, weights.down.shape[0])", "c_rows")
r.write_text(s)
print("ok")
