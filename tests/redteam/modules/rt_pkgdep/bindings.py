from celerybridge import remote_task


@remote_task(name="rt.dep", queue="rt")
def dep(x: int) -> int: ...
