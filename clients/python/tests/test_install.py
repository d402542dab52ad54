"""`pip install ./clients/python` from a copy of the checkout into a fresh virtualenv.

The copy holds only proto/ and clients/python/ (no generated files, no build directory), as
a clean clone does; pip builds with isolation, so the build needs nothing but what
pyproject.toml's build-system requires. Needs PyPI (or a mirror pip is configured for).
"""

import pathlib
import shutil
import subprocess
import sys
import tempfile
import textwrap
import unittest

ROOT = pathlib.Path(__file__).resolve().parents[3]

# Run inside the fresh environment: imports, the docstrings help() shows, the typed stubs,
# and no top-level module names taken from the proto paths.
CHECK = textwrap.dedent("""
    import importlib.util, pathlib, pydoc
    import grpc
    import mip_client
    from mip_client import follow_customers
    from mip_client.crm.v1 import crm_pb2, crm_pb2_grpc
    from mip_client.inventory.v1 import inventory_pb2_grpc
    from mip_client.integration.v1 import integration_pb2_grpc

    stub = crm_pb2_grpc.CrmServiceStub(grpc.insecure_channel("127.0.0.1:1"))
    text = lambda thing: pydoc.render_doc(thing, renderer=pydoc.plaintext)
    assert "Creates a customer." in text(stub.CreateCustomer), text(stub.CreateCustomer)
    assert "returns (stream crm.v1.WatchCustomersResponse)" in text(stub.WatchCustomers)
    assert "stores customers and publishes every change" in text(crm_pb2_grpc.CrmServiceStub)
    assert "Server-assigned identifier" in text(crm_pb2.Customer), text(crm_pb2.Customer)
    assert "The customer was created." in text(crm_pb2.CustomerEventType)
    import pickle
    customer = crm_pb2.Customer(id="c1", name="Ada")
    assert crm_pb2.Customer.__module__ == "mip_client.crm.v1.crm_pb2", crm_pb2.Customer.__module__
    assert pickle.loads(pickle.dumps(customer)) == customer
    package = pathlib.Path(mip_client.__file__).parent
    for stub_file in ("crm/v1/crm_pb2.pyi", "crm/v1/crm_pb2_grpc.pyi", "py.typed"):
        assert (package / stub_file).exists(), stub_file
    assert "Server-assigned identifier" in (package / "crm/v1/crm_pb2.pyi").read_text()
    for name in ("crm", "inventory", "integration"):
        assert importlib.util.find_spec(name) is None, f"top-level {name} is installed"
    print("installed package OK")
""")


class InstallTest(unittest.TestCase):
    def test_pip_installs_the_package_from_a_clean_copy_into_a_fresh_venv(self):
        work = pathlib.Path(tempfile.mkdtemp(prefix="mip-py-install-"))
        self.addCleanup(shutil.rmtree, work, ignore_errors=True)
        checkout = work / "checkout"
        shutil.copytree(ROOT / "proto", checkout / "proto")
        shutil.copytree(ROOT / "clients" / "python", checkout / "clients" / "python",
                        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        venv = work / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        python = str(venv / "bin" / "python")
        install = subprocess.run(
            [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             str(checkout / "clients" / "python")],
            capture_output=True, text=True, timeout=600,
        )
        self.assertEqual(install.returncode, 0, install.stdout + install.stderr)
        check = subprocess.run([python, "-c", CHECK], capture_output=True, text=True,
                               timeout=60, cwd=work)
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        leftovers = sorted(
            str(path.relative_to(checkout)) for path in (checkout / "clients/python").rglob("*")
            if path.name in ("build", "crm", "inventory", "integration")
            or path.name.endswith(".egg-info") or path.name.endswith("_pb2.py")
        )
        self.assertEqual(leftovers, [], "the build wrote into the checkout")


if __name__ == "__main__":
    unittest.main()
