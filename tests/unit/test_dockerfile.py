"""What can be checked of the image without a Docker daemon: the Dockerfile builds from Ray's image
of the Ray version pyproject.toml pins, installs an extra pyproject.toml defines for each variant,
and the KubeRay manifest runs the image the Dockerfile's build command tags, on that Ray version."""
import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def dockerfile_args() -> dict[str, str]:
    text = (REPO / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S*)", text, re.M))


def pinned_ray_version() -> str:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ray = [d for d in project["dependencies"] if re.match(r"ray(\[|=|>|<|\s|$)", d)]
    assert len(ray) == 1, ray
    match = re.search(r"==\s*([\w.]+)", ray[0])
    assert match, f"pyproject.toml must pin ray exactly (the image and the cluster use one version): {ray[0]}"
    return match.group(1)


def test_the_image_is_rays_image_of_the_pinned_version_with_an_extra_per_variant():
    text = (REPO / "Dockerfile").read_text()
    args = dockerfile_args()
    assert args["RAY_VERSION"] == pinned_ray_version()
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON\}-\$\{VARIANT\}$", text, re.M)
    assert 'pip install --no-cache-dir -e ".[${VARIANT}]"' in text
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert args["VARIANT"] == "gpu" and {"gpu", "cpu"} <= set(extras)  # the documented variants exist as extras
    assert re.search(r"docker build --build-arg VARIANT=cpu", text)


def test_manifests_run_the_image_the_dockerfile_builds_on_the_same_ray():
    text = (REPO / "Dockerfile").read_text()
    tag = re.search(r"docker build -t (\S+) \.", text).group(1)
    rayjob = yaml.safe_load((REPO / "deploy" / "k8s" / "rayjob.yaml").read_text())
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == dockerfile_args()["RAY_VERSION"]
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    images = {c["image"] for pod in pods for c in pod["template"]["spec"]["containers"]}
    assert images == {tag}, images
