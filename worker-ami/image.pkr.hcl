# The nightshift worker image: arm64 Amazon Linux 2023 with the worker binary,
# its systemd unit and the CloudWatch agent, so that a worker boots without
# fetching anything. Run from the repository root after `make package`, which
# leaves the worker and its unit in dist/worker/ (see worker-ami/README.md):
#
#   packer init worker-ami/image.pkr.hcl
#   packer build worker-ami/image.pkr.hcl

packer {
  required_plugins {
    amazon = {
      version = ">= 1.3.0"
      source  = "github.com/hashicorp/amazon"
    }
  }
}

variable "region" {
  type        = string
  default     = "us-east-1"
  description = "Region to build the image in (the stack's region)."
}

variable "worker_dir" {
  type        = string
  default     = "dist/worker"
  description = "Where `make package` leaves nightshift-worker (aarch64 Linux, glibc 2.34 or older: Amazon Linux 2023's) and nightshift-worker.service; relative to the directory packer runs in."
}

variable "instance_type" {
  type        = string
  default     = "t4g.small"
  description = "arm64 instance type that builds the image."
}

variable "ami_name_prefix" {
  type    = string
  default = "nightshift-worker"
}

locals {
  build_time = formatdate("YYYYMMDDhhmmss", timestamp())
}

source "amazon-ebs" "worker" {
  region          = var.region
  instance_type   = var.instance_type
  ssh_username    = "ec2-user"
  ami_name        = "${var.ami_name_prefix}-${local.build_time}"
  ami_description = "nightshift worker (arm64, Amazon Linux 2023)"
  imds_support    = "v2.0"

  source_ami_filter {
    filters = {
      # The standard image, not the minimal one.
      name                = "al2023-ami-2023.*-kernel-*-arm64"
      architecture        = "arm64"
      root-device-type    = "ebs"
      virtualization-type = "hvm"
    }
    owners      = ["amazon"]
    most_recent = true
  }

  # The build instance follows the same metadata rules as the workers.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  tags = {
    Name             = "${var.ami_name_prefix}-${local.build_time}"
    "nightshift:ami" = "worker"
    "source-ami"     = "{{ .SourceAMI }}"
  }
}

build {
  sources = ["source.amazon-ebs.worker"]

  # The same two files that `make upload-worker` puts in the artifacts
  # bucket for workers booting from the stock image.
  provisioner "file" {
    source      = "${var.worker_dir}/nightshift-worker"
    destination = "/tmp/nightshift-worker"
  }

  provisioner "file" {
    source      = "${var.worker_dir}/nightshift-worker.service"
    destination = "/tmp/nightshift-worker.service"
  }

  provisioner "shell" {
    inline = [
      "set -eux",
      "sudo dnf -y upgrade --refresh",
      # Ships the worker's log; the launch template's boot script configures it.
      "sudo dnf -y install amazon-cloudwatch-agent",
      "sudo useradd --system --no-create-home --home-dir /var/lib/nightshift --shell /sbin/nologin nightshift",
      "sudo install -o root -g root -m 0755 /tmp/nightshift-worker /usr/local/bin/nightshift-worker",
      "sudo install -o root -g root -m 0644 /tmp/nightshift-worker.service /etc/systemd/system/nightshift-worker.service",
      "sudo install -d -o root -g root -m 0755 /etc/nightshift /var/log/nightshift",
      "rm -f /tmp/nightshift-worker /tmp/nightshift-worker.service",
      # Refuse to bake a binary that needs a newer glibc than this image has.
      "if ldd /usr/local/bin/nightshift-worker 2>&1 | grep 'not found'; then exit 1; fi",
      # Not enabled here: the launch template's boot script enables and
      # starts it once the boot config and the log drop-in are in place, on
      # this image as on the stock one.
      "sudo systemctl daemon-reload",
      # Every instance runs its own user data afresh.
      "sudo cloud-init clean --logs",
    ]
  }

  post-processor "manifest" {
    output     = "dist/worker-ami-manifest.json"
    strip_path = true
  }
}
