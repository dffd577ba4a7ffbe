"""The naive routing, for benchmarks: every g_t runs on the whole batch, and a row keeps g_t's
answer only where f sent it to t and g_t disagrees. The same outputs as :mod:`.routing` at the
cost of running every g_t on every row."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .routing import RoutingPass, answers_const, clone_g, start_routing


class RouteWholeBatch(RoutingPass):
    """Adds every g_t on the whole batch and the row-wise choice of answers."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        b = self.b
        r = self.routed
        shared = start_routing(b, model, self.repairs, r)
        label_f = shared["label_f"]
        for j, t in enumerate(self.repairs.targets):
            tag = f"g{t}"
            t_const = b.const(f"bna/{tag}/target", np.array(t, np.int64))
            every = b.one("Equal", [label_f, label_f], f"bna/{tag}/every_row")
            rows = b.one("NonZero", [every], f"bna/{tag}/nonzero")
            idx = b.one("Reshape", [rows, shared["flat"]], f"bna/{tag}/rows")
            among = answers_const(b, self.repairs, j, r.logits_f)
            g, y_g, flag = clone_g(b, tag, self.repairs, j, idx, r, t_const, among)
            sent = b.one("Equal", [label_f, t_const], f"bna/{tag}/sent")
            flag = b.one("And", [flag, sent], f"bna/{tag}/flag_sent")
            flag_col = b.one("Reshape", [flag, shared["column"]], f"bna/{tag}/flag_col")
            r.label = b.one("Where", [flag, y_g, r.label], f"bna/{tag}/label_out")
            r.triggered = b.one("Or", [r.triggered, flag], f"bna/{tag}/triggered_out")
            r.logits = b.one("Where", [flag_col, g, r.logits], f"bna/{tag}/logits_out")
        return ir.passes.PassResult(model, True)
