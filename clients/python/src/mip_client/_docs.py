"""Puts the proto comments where `help()` looks for them.

protoc's Python output keeps no comments on messages, and grpc's stubs create their methods in
`__init__` as objects that have no docstrings of their own (only the servicer methods get the
RPC comments). The build appends one call to each generated module (see generate.py):

* `document_stubs(globals())` in `*_pb2_grpc.py`: every `XStub` instance gets, for each RPC, a
  plain function with the servicer method's docstring (the RPC's proto comment) and the
  request and response types, which forwards to grpc's multicallable (`with_call` and
  `future` included), so `help(stub.CreateCustomer)` shows the contract;
* `document_messages(globals(), DOCS)` in `*_pb2.py`: each message class's docstring becomes
  its proto comment plus one line per field, and each enum's its comment plus its values.
"""

import inspect
from typing import Any

# The multicallable attributes passed through, where the call kind has them.
_PASSED_THROUGH = ("with_call", "future")


def _method_doc(stub_name: str, name: str, servicer_doc: str, method) -> str:
    """The docstring of one stub method: the RPC comment, then its types."""
    text = inspect.cleandoc(servicer_doc or "")
    if method is None:
        return text
    streams = ("stream " if method.client_streaming else "",
               "stream " if method.server_streaming else "")
    signature = (f"rpc {method.name}({streams[0]}{method.input_type.full_name}) "
                 f"returns ({streams[1]}{method.output_type.full_name})")
    return f"{text}\n\n{signature}" if text else signature


def _wrap(multicallable, module: str, qualname: str, doc: str):
    def call(request, *args, **kwargs):
        return multicallable(request, *args, **kwargs)

    call.__module__ = module
    call.__name__ = qualname.rsplit(".", 1)[-1]
    call.__qualname__ = qualname
    call.__doc__ = doc
    for attribute in _PASSED_THROUGH:
        if hasattr(multicallable, attribute):
            setattr(call, attribute, getattr(multicallable, attribute))
    return call


def _service_descriptor(module_globals: dict, service: str):
    """The ServiceDescriptor named `service` in the messages module this grpc module imports."""
    for value in module_globals.values():
        descriptor = getattr(value, "DESCRIPTOR", None)
        services = getattr(descriptor, "services_by_name", None)
        if services and service in services:
            return services[service]
    return None


def document_stubs(module_globals: dict) -> None:
    """Gives every stub class of a generated grpc module documented methods."""
    for stub_name, stub in list(module_globals.items()):
        if not (isinstance(stub, type) and stub_name.endswith("Stub")):
            continue
        service = stub_name[: -len("Stub")]
        servicer = module_globals.get(f"{service}Servicer")
        if servicer is None:
            continue
        descriptor = _service_descriptor(module_globals, service)
        docs = {}
        for name, function in vars(servicer).items():
            if name.startswith("_") or not callable(function):
                continue
            method = descriptor.methods_by_name.get(name) if descriptor else None
            docs[name] = _method_doc(stub_name, name, function.__doc__, method)
        _patch(stub, stub_name, docs)


def _patch(stub: Any, stub_name: str, docs: dict) -> None:
    original_init = stub.__init__
    module = stub.__module__

    def __init__(self, channel):
        original_init(self, channel)
        for name, doc in docs.items():
            setattr(self, name, _wrap(getattr(self, name), module, f"{stub_name}.{name}", doc))

    __init__.__doc__ = original_init.__doc__
    stub.__init__ = __init__
    # Class-level placeholders so `help(XStub)` lists the methods and their comments too; the
    # instance attributes set in __init__ take precedence for calls.
    for name, doc in docs.items():
        def unbound(self, request, *args, **kwargs):
            raise TypeError("call this method on a stub instance")

        unbound.__module__ = module
        unbound.__name__ = name
        unbound.__qualname__ = f"{stub_name}.{name}"
        unbound.__doc__ = doc
        setattr(stub, name, unbound)


def document_messages(module_globals: dict, docs: dict) -> None:
    """Sets the docstrings of a generated messages module's classes from `docs`, which maps a
    message's or enum's full proto name to (its comment, {field or value name: comment})."""
    descriptor = module_globals.get("DESCRIPTOR")
    if descriptor is None:
        return
    for value in list(module_globals.values()):
        inner = getattr(value, "DESCRIPTOR", None)
        full_name = getattr(inner, "full_name", None)
        if isinstance(full_name, str) and full_name in docs:
            _document(value, docs, full_name)


def _document(value, docs: dict, full_name: str) -> None:
    comment, members = docs[full_name]
    lines = [comment.strip()] if comment.strip() else []
    if members:
        lines.append("")
        width = max(len(member) for member in members)
        for member, text in members.items():
            first, *rest = (text.strip() or "(no comment)").splitlines()
            lines.append(f"{member.ljust(width)}  {first}")
            lines.extend(f"{' ' * width}  {line}" for line in rest)
    try:
        value.__doc__ = "\n".join(lines)
    except (AttributeError, TypeError):
        return
    # Nested messages and enums are attributes of their parent class.
    for nested_name in list(vars(value)) if isinstance(value, type) else []:
        nested = getattr(value, nested_name, None)
        nested_full = getattr(getattr(nested, "DESCRIPTOR", None), "full_name", None)
        if isinstance(nested_full, str) and nested_full in docs and nested_full != full_name:
            _document(nested, docs, nested_full)
