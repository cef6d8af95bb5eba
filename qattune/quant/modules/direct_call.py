"""A torch.compile'd function whose repeated calls skip Dynamo.

Each call of a compiled function first runs Dynamo: its frame hook, then the guards that pick a compiled
graph. For the small, frequent fake quantizations of a training step on a GPU that costs the host more
than the kernels take (docs/benchmarks.md: about 0.15 ms a call, 160 calls a step). The graph Dynamo
picks depends only on what its guards read: here the tensor's dtype, device, shape, strides and flags,
and the format (one compiled function per format). So `DirectCompiled` calls through Dynamo once per
such signature, records which compiled graph ran and with which arguments, and from then on calls that
graph directly. It only does so after checking, on that first call, that it can rebuild the graph's
arguments from the call's own (by identity) and find the function's results among the graph's outputs
(by identity); otherwise that signature keeps going through Dynamo. The numbers are those of the
compiled graph either way: the same code runs, only the dispatch differs.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor


class _Graph:
    """One graph compiled by Inductor, and the expressions (Dynamo sources) of its arguments."""

    def __init__(self, compiled: Callable, sources: list[Optional[str]]) -> None:
        self.compiled = compiled
        self.sources = sources
        self._getter: Optional[Callable] = None

    def arguments_getter(self) -> Optional[Callable[[dict], tuple]]:
        """`L -> graph arguments`, L being the call's local names; None if a source is not an expression."""
        if self._getter is None and all(self.sources):
            try:
                self._getter = eval("lambda L: (" + "".join(f"{s}, " for s in self.sources) + ")")  # noqa: S307
            except SyntaxError:
                self.sources = [None]
        return self._getter


def _same(a: Any, b: Any) -> bool:
    return a is b if isinstance(a, Tensor) or isinstance(b, Tensor) else type(a) is type(b) and a == b


class DirectCompiled:
    """`torch.compile(function, dynamic=False)` for calls `(fmt, x)` returning a tuple of tensors (or
    None); repeated calls with one signature of `x` call the compiled graph without Dynamo."""

    def __init__(self, function: Callable, arg_names: tuple[str, str] = ("fmt", "x")) -> None:
        self._compiled = torch.compile(function, dynamic=False, backend=self._compile_graph)
        self._arg_names = arg_names
        self._served: Optional[tuple[_Graph, tuple, Any]] = None  # the graph Dynamo's last call ran
        self._direct: dict[tuple, Optional[tuple[_Graph, Callable, tuple]]] = {}

    def _compile_graph(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        """The Dynamo backend: Inductor (what torch.compile's default backend runs), recording each call."""
        from torch._inductor.compile_fx import compile_fx

        compiled = compile_fx(gm, example_inputs)
        sources = []
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                grapharg = node.meta.get("grapharg")
                name = getattr(getattr(grapharg, "source", None), "name", None)
                sources.append(name() if callable(name) else name)  # a method in older torch
        graph = _Graph(compiled, [s if isinstance(s, str) else None for s in sources])

        def run(*args):
            outputs = compiled(*args)
            self._served = (graph, args, outputs)
            return outputs

        return run

    @staticmethod
    def _signature(x: Tensor) -> tuple:
        return (x.dtype, x.device, tuple(x.shape), x.stride(), x.requires_grad, x.is_inference(),
                torch.is_grad_enabled())

    def __call__(self, fmt: Any, x: Tensor) -> tuple:
        signature = self._signature(x)
        direct = self._direct.get(signature)
        if direct is not None:
            graph, getter, picks = direct
            outputs = graph.compiled(*getter({self._arg_names[0]: fmt, self._arg_names[1]: x}))
            return tuple(None if i is None else outputs[i] for i in picks)
        self._served = None
        result = self._compiled(fmt, x)
        if signature not in self._direct:
            self._direct[signature] = self._direct_route(fmt, x, result)
        self._served = None
        return result

    def _direct_route(self, fmt: Any, x: Tensor, result: Any) -> Optional[tuple[_Graph, Callable, tuple]]:
        """How to repeat the call Dynamo just made without it, or None where that cannot be verified."""
        if self._served is None or not isinstance(result, tuple):
            return None
        graph, args, outputs = self._served
        getter = graph.arguments_getter()
        if getter is None:
            return None
        try:
            rebuilt = getter({self._arg_names[0]: fmt, self._arg_names[1]: x})
        except Exception:
            return None
        if len(rebuilt) != len(args) or not all(_same(a, b) for a, b in zip(rebuilt, args)):
            return None
        picks = []
        for value in result:
            index = next((i for i, out in enumerate(outputs) if out is value), None)
            if value is not None and index is None:
                return None
            picks.append(index)
        return graph, getter, tuple(picks)
