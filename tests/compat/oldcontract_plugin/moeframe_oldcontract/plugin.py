"""The hooks only; the implementations are named as "module:Class" strings."""

import moeframe

moeframe_plugin_api = 1   # the hook contract this plugin was written for


@moeframe.hookimpl
def register_kernels():
    return [
        moeframe.Strategy(
            name="old_gathered",
            impl="moeframe_oldcontract.kernel:GatheredKernel",
            description="one batched matmul per (token, k) pair",
            capabilities=moeframe.Capabilities(dtypes=["float32", "bfloat16"], devices=["cpu"]),
        )
    ]


@moeframe.hookimpl
def register_wrappers():
    return [
        moeframe.Strategy("old_staging", "moeframe_oldcontract.wrapper:StagingWrapper",
                          "copies the tokens into a workspace buffer and counts the calls",
                          rules=moeframe.OrderingRules(inside=["chunking"])),
    ]


@moeframe.hookimpl
def register_routers():
    return [
        moeframe.Strategy("old_softmax", "moeframe_oldcontract.router:TemperatureSoftmaxRouter",
                          "softmax with a temperature, top-k, renormalised"),
    ]
