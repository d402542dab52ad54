#!/usr/bin/env python3
"""Generates the `mip_client` package's gRPC modules from the platform's contracts.

`pip install ./clients/python` runs this as part of the build (see setup.py), so most users
never call it. Run it by hand to get an importable copy of the package without installing
it, for example to read the generated code:

    python3 clients/python/generate.py --out /tmp/mip-py
    PYTHONPATH=/tmp/mip-py python3 -c "import mip_client.crm.v1.crm_pb2"

It needs `grpcio-tools` (protoc and the well-known types) and `mypy-protobuf` (the `.pyi`
stubs; `--skip-pyi` leaves them out), the versions the build pins in pyproject.toml. The
generated modules need only grpcio and protobuf; `mip_client.follow_customers` also needs
googleapis-common-protos.

Layout: `proto/crm/v1/crm.proto` becomes `mip_client/crm/v1/crm_pb2.py` (messages),
`crm_pb2_grpc.py` (stubs and servicers) and a `.pyi` beside each. protoc writes imports that
follow the proto paths (`from crm.v1 import crm_pb2`), which would need a top-level `crm`
package; they are rewritten to `from mip_client.crm.v1 import crm_pb2`, so the package owns
no top-level name but its own. Descriptor file names stay `crm/v1/crm.proto`, as the servers'
reflection reports them.
"""

import argparse
import pathlib
import pprint
import re
import shutil
import stat
import sys
import tempfile
from typing import Optional

HERE = pathlib.Path(__file__).resolve().parent
PACKAGE = "mip_client"
SOURCE = HERE / "src" / PACKAGE

# Appended to every generated *_pb2_grpc.py: grpc's stubs create their methods per instance,
# without docstrings, so `help()` on a stub would show none of the proto comments that the
# servicer methods carry. mip_client._docs copies them over.
DOCUMENT_STUBS = f"""

# Added by the {PACKAGE} build: gives each stub method the proto comment of its RPC.
from {PACKAGE} import _docs as _{PACKAGE}_docs  # noqa: E402

_{PACKAGE}_docs.document_stubs(globals())
"""


# Appended to every generated *_pb2.py: protoc keeps no comments in Python message classes;
# the build reads them from the descriptor set and mip_client._docs sets them as docstrings.
DOCUMENT_MESSAGES = f"""

# Added by the {PACKAGE} build: the proto comments of this file's messages and enums.
from {PACKAGE} import _docs as _{PACKAGE}_docs  # noqa: E402

_{PACKAGE}_docs.document_messages(globals(), {{docs}})
"""

# Field numbers of the descriptor.proto paths that SourceCodeInfo locations use.
FILE_MESSAGES, FILE_ENUMS = 4, 5
MESSAGE_FIELDS, MESSAGE_NESTED, MESSAGE_ENUMS = 2, 3, 4
ENUM_VALUES = 2


def proto_root() -> pathlib.Path:
    """The contracts: proto/ beside this file in an sdist, else the repository's proto/."""
    for candidate in (HERE / "proto", HERE.parent.parent / "proto"):
        if any(candidate.rglob("*.proto")):
            return candidate
    raise SystemExit(
        f"no .proto files in {HERE / 'proto'} or {HERE.parent.parent / 'proto'}: build "
        "from a checkout of the repository (or from its sdist)"
    )


def include_paths() -> list:
    """Where protoc finds the protos' imports: grpcio-tools ships google/protobuf/*.proto;
    googleapis-common-protos ships google/rpc/*.proto, if a contract ever imports those."""
    import grpc_tools

    paths = [pathlib.Path(grpc_tools.__file__).parent / "_proto"]
    try:
        import google.rpc

        rpc = pathlib.Path(next(iter(google.rpc.__path__)))
        if (rpc / "status.proto").exists():
            paths.append(rpc.parent.parent)
    except ImportError:
        pass
    return paths


def plugin(name: str, scratch: pathlib.Path) -> str:
    """Path of a protoc plugin executable. mypy-protobuf installs them as console scripts, on
    PATH in pip's isolated build environment; failing that, a wrapper that runs the plugin
    with this interpreter."""
    found = shutil.which(name) or shutil.which(name, path=str(pathlib.Path(sys.executable).parent))
    if found:
        return found
    entry = {"protoc-gen-mypy": "main", "protoc-gen-mypy_grpc": "grpc"}[name]
    wrapper = scratch / name
    wrapper.write_text(
        f"#!{sys.executable}\nfrom mypy_protobuf.main import {entry}\n{entry}()\n"
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    return str(wrapper)


def rewrite_imports(text: str, top_level: list) -> str:
    """Moves protoc's proto-path imports (`from crm.v1 import`, `import crm.v1.x`) and module
    names under the package. Nothing else is touched: strings such as '/crm.v1.CrmService/...'
    are method paths on the wire and must stay."""
    names = "|".join(re.escape(name) for name in top_level)
    # The module name protobuf gives the message classes (their __module__, which pickle uses
    # to find them again).
    text = re.sub(rf"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')({names})\.",
                  rf"\1{PACKAGE}.\2.", text)
    text = re.sub(rf"^(\s*)from ({names})((?:\.\w+)*) import ", rf"\1from {PACKAGE}.\2\3 import ",
                  text, flags=re.MULTILINE)
    return re.sub(rf"^(\s*)import ({names})((?:\.\w+)+)", rf"\1import {PACKAGE}.\2\3", text,
                  flags=re.MULTILINE)


def tidy(comment: str) -> str:
    """A proto comment without the space after each `//`."""
    return "\n".join(line[1:] if line.startswith(" ") else line
                     for line in comment.splitlines()).strip()


def comments(descriptor_set: pathlib.Path) -> dict:
    """Per proto file, {message or enum full name: (comment, {member: comment})}, read from
    a descriptor set written with --include_source_info."""
    from google.protobuf import descriptor_pb2

    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file
    result = {}
    for file in files:
        located = {
            tuple(location.path): tidy(location.leading_comments or location.trailing_comments)
            for location in file.source_code_info.location
        }
        docs = {}
        for i, proto in enumerate(file.message_type):
            document_message(proto, (FILE_MESSAGES, i), file.package, located, docs)
        for i, proto in enumerate(file.enum_type):
            document_enum(proto, (FILE_ENUMS, i), file.package, located, docs)
        result[file.name] = docs
    return result


def document_enum(proto, path: tuple, scope: str, located: dict, docs: dict) -> None:
    values = {v.name: located.get((*path, ENUM_VALUES, i), "") for i, v in enumerate(proto.value)}
    docs[f"{scope}.{proto.name}"] = (located.get(path, ""), values)


def document_message(proto, path: tuple, scope: str, located: dict, docs: dict) -> None:
    full = f"{scope}.{proto.name}"
    fields = {f.name: located.get((*path, MESSAGE_FIELDS, i), "")
              for i, f in enumerate(proto.field)}
    docs[full] = (located.get(path, ""), fields)
    for i, nested in enumerate(proto.nested_type):
        if not nested.options.map_entry:
            document_message(nested, (*path, MESSAGE_NESTED, i), full, located, docs)
    for i, nested in enumerate(proto.enum_type):
        document_enum(nested, (*path, MESSAGE_ENUMS, i), full, located, docs)


def generate_stubs(package_dir: pathlib.Path, protos: Optional[pathlib.Path] = None,
                   typed: bool = True) -> list:
    """Writes the generated modules (and their `__init__.py`s) into `package_dir`, the
    directory of the `mip_client` package; with `typed`, the `.pyi` stubs too (needs
    mypy-protobuf). Returns the files written."""
    from grpc_tools import protoc

    protos = protos or proto_root()
    # google/... protos (well-known types, google.rpc) come generated with protobuf and
    # googleapis-common-protos: generating them again would register their descriptors
    # twice. A copy under proto/ is only read, for imports.
    files = sorted(str(p.relative_to(protos)) for p in protos.rglob("*.proto")
                   if p.relative_to(protos).parts[0] != "google")
    top_level = sorted({pathlib.PurePath(f).parts[0] for f in files})
    clash = [name for name in top_level
             if (SOURCE / name).exists() or (SOURCE / f"{name}.py").exists()]
    if clash:
        raise SystemExit(f"proto directories {clash} clash with {PACKAGE}'s own modules")
    with tempfile.TemporaryDirectory(prefix="mip-protoc-") as scratch:
        scratch = pathlib.Path(scratch)
        out = scratch / "out"
        out.mkdir()
        typed_args = [
            f"--plugin=protoc-gen-mypy={plugin('protoc-gen-mypy', scratch)}",
            f"--plugin=protoc-gen-mypy_grpc={plugin('protoc-gen-mypy_grpc', scratch)}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
        ] if typed else []
        args = [
            "grpc_tools.protoc",
            f"-I{protos}",
            *(f"-I{path}" for path in include_paths()),
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            *typed_args,
            f"--descriptor_set_out={scratch / 'descriptors.pb'}",
            "--include_source_info",
            *files,
        ]
        code = protoc.main(args)
        if code != 0:
            raise SystemExit(f"protoc failed with exit code {code}")
        documented = comments(scratch / "descriptors.pb")
        written = []
        for source in sorted(out.rglob("*")):
            if source.is_dir():
                continue
            target = package_dir / source.relative_to(out)
            target.parent.mkdir(parents=True, exist_ok=True)
            text = rewrite_imports(source.read_text(), top_level)
            if source.name.endswith("_pb2_grpc.py"):
                text += DOCUMENT_STUBS
            elif source.name.endswith("_pb2.py"):
                proto = str(source.relative_to(out))[: -len("_pb2.py")] + ".proto"
                docs = pprint.pformat(documented.get(proto, {}), width=96, sort_dicts=False)
                text += DOCUMENT_MESSAGES.format(docs=docs)
            target.write_text(text)
            written.append(target)
        # Every directory of the proto tree becomes a package.
        for folder in sorted({path.parent for path in written}):
            while folder != package_dir:
                init = folder / "__init__.py"
                if not init.exists():
                    dotted = ".".join((PACKAGE, *folder.relative_to(package_dir).parts))
                    init.write_text(f'"""Generated from proto/: {dotted}."""\n')
                    written.append(init)
                folder = folder.parent
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", required=True, type=pathlib.Path,
        help="directory to write the complete mip_client package into (as OUT/mip_client)",
    )
    parser.add_argument(
        "--proto", type=pathlib.Path, default=None,
        help="root of the .proto files (default: the repository's proto/)",
    )
    parser.add_argument(
        "--skip-pyi", action="store_true",
        help="leave out the .pyi stubs, so mypy-protobuf need not be installed",
    )
    args = parser.parse_args()
    package_dir = args.out.resolve() / PACKAGE
    if package_dir.exists():
        shutil.rmtree(package_dir)
    # The hand-written modules first, so the generated ones can import mip_client._docs.
    shutil.copytree(SOURCE, package_dir, ignore=shutil.ignore_patterns("__pycache__"))
    written = generate_stubs(package_dir, args.proto.resolve() if args.proto else None,
                             typed=not args.skip_pyi)
    print(f"wrote {PACKAGE} ({len(written)} generated files) into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
