"""Methods with a blocking form and an async one, in Modal's spelling.

``sb.wait()`` blocks; ``await sb.wait.aio()`` is the same call for async
code. Each method is written once, as a coroutine function; the two forms
differ only in how that coroutine is run.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")
S = TypeVar("S")

Runner = Callable[[Coroutine[Any, Any, Any]], Any]


class Dual(Generic[P, T]):
    """A bound call: ``f(...)`` blocks until done, ``await f.aio(...)`` does not."""

    __slots__ = ("_blocking", "_coro", "_in_async")

    def __init__(
        self,
        coro: Callable[P, Coroutine[Any, Any, T]],
        blocking: Runner,
        in_async: Runner,
    ) -> None:
        self._coro = coro
        self._blocking = blocking
        self._in_async = in_async

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> T:
        result: T = self._blocking(self._coro(*args, **kwargs))
        return result

    def aio(self, *args: P.args, **kwargs: P.kwargs) -> Awaitable[T]:
        """The async form of the call."""
        result: Awaitable[T] = self._in_async(self._coro(*args, **kwargs))
        return result


class dual_method(Generic[S, P, T]):
    """Make a coroutine method into a :class:`Dual` when looked up.

    ``blocking`` runs the coroutine to completion from a plain thread;
    ``in_async`` turns it into something the caller's event loop can await.
    With ``on_class=True`` the method binds the class, as a classmethod does.
    """

    def __init__(
        self,
        fn: Callable[Concatenate[S, P], Coroutine[Any, Any, T]],
        blocking: Runner,
        in_async: Runner,
        *,
        on_class: bool = False,
    ) -> None:
        self._fn = fn
        self._blocking = blocking
        self._in_async = in_async
        self._on_class = on_class
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", "method")

    def __get__(self, obj: Any, owner: type | None = None) -> Dual[P, T]:
        target: Any = owner if self._on_class else obj
        if target is None:
            return self  # type: ignore[return-value]  # looked up on the class: help(), docs
        fn = self._fn

        def bound(*args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, T]:
            return fn(target, *args, **kwargs)

        return Dual(bound, self._blocking, self._in_async)
