# The rig's kubelet node: a real node that runs pods from images built here (no registry).
# Sourced by dev/rig (it uses start/stop_one/alive from there), never run on its own.
#
# The node lives in network namespace clb-kubelet at $NODE_IP on the rig bridge. Inside it,
# containerd (Debian's, with runc and the CNI bridge plugin) runs in a mount namespace of its own
# where cgroup v1 is re-mounted and the host paths kubelet/containerd insist on are tmpfs, so the
# host's disk, sysctls and iptables stay as they were; kubelet and kube-proxy join that mount
# namespace. Every process of the node — containerd, its shims, every container, kubelet and
# kube-proxy — runs inside the cgroup /cloudlb-rig, so `down` stops exactly those (the kernel's
# record of what the rig started), then removes the cgroups, the namespace and the route.
#
# Facts behind each choice: ../shared/DESIGN.md §4.5.

NODE_NAME=cloudlb-rig-node
NODE_NS=kubelet
NODE_IP=$RIG_NET_PREFIX.250.2
POD_CIDR=$RIG_NET_PREFIX.240.0/24
POD_GW=$RIG_NET_PREFIX.240.1
NODE_DIR=$RIG_DIR/node
NODE_CGROUP=cloudlb-rig
NODE_CGROUP_CONTROLLERS=(cpu cpuacct cpuset memory devices freezer blkio pids systemd)
# Host paths kubelet and containerd write whatever their configured directories say; inside the
# node's mount namespace each is a tmpfs. Those the host lacked are created empty and removed by down.
NODE_HOST_PATHS=(/var/lib/kubelet /usr/libexec/kubernetes /var/log/containers /var/log/pods /var/lib/cni /run/containerd /run/netns)
RIG_IMAGES=$CLOUDLB_CACHE/images

node_cgroup() { echo "/sys/fs/cgroup/$1/$NODE_CGROUP"; }

# Builds the rig's own images (sandbox "pause" and the demo web server) from C sources with
# gcc -static, cached by their sources' hash.
node_images() {
  mkdir -p "$RIG_IMAGES"
  local name src hash out root
  for name in pause hello; do
    src=$REPO_ROOT/dev/images/$name.c
    hash=$(cat "$src" "$REPO_ROOT/dev/archive-image" | sha256sum | cut -c1-16)
    out=$RIG_IMAGES/$name-$hash.tar
    if [[ ! -f $out ]]; then
      root=$(mktemp -d)
      gcc -static -O2 -o "$root/$name" "$src" -lpthread
      "$REPO_ROOT/dev/archive-image" --tag "localhost/rig/$name:1" --entrypoint "/$name" --user 65532:65532 "$root" "$out" 2>/dev/null
      rm -rf "$root"
    fi
    ln -sf "$out" "$RIG_IMAGES/$name.tar"
  done
}

node_configs() {
  local d=$NODE_DIR
  mkdir -p "$d"/{containerd,cni/net.d,cni/ipam,kubelet,podlogs,volume-plugins,sysctl}
  kubeconfig_token "$d/kubelet.kubeconfig" "https://$HOST_IP:$APISERVER_PORT" "$(cat "$RIG_DIR/pki/node.token")"
  kubeconfig_token "$d/kube-proxy.kubeconfig" "https://$HOST_IP:$APISERVER_PORT" "$(cat "$RIG_DIR/pki/kube-proxy.token")"
  cat >"$d/containerd.toml" <<EOF
version = 2
root = "$d/containerd/root"
state = "$d/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "$d/containerd/containerd.sock"
[ttrpc]
  address = "$d/containerd/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$d/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/rig/pause:1"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "$(command -v runc)"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$d/cni/net.d"
    max_conf_num = 1
EOF
  cat >"$d/cni/net.d/10-rig.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "rig",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "dataDir": "$d/cni/ipam", "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$POD_GW"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  cat >"$d/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /$NODE_CGROUP
failSwapOn: false
containerRuntimeEndpoint: unix://$d/containerd/containerd.sock
providerID: aws:///us-east-1a/$NODE_INSTANCE
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization:
  mode: AlwaysAllow
podLogsDir: $d/podlogs
clusterDomain: cluster.local
resolvConf: ""
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
serializeImagePulls: false
registerNode: true
maxPods: 40
oomScoreAdj: 0
EOF
  cat >"$d/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $d/kube-proxy.kubeconfig}
mode: iptables
hostnameOverride: $NODE_NAME
bindAddress: $NODE_IP
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
clusterCIDR: $POD_CIDR
detectLocalMode: ClusterCIDR
oomScoreAdj: 0
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s, tcpBeLiberal: false, udpTimeout: 0s, udpStreamTimeout: 0s}
EOF
  # kubelet sets these three global sysctls unless they already hold its values: inside the node's
  # mount namespace, files with exactly those values sit over them, so the host's stay untouched.
  printf '10\n' >"$d/sysctl/kernel.panic"
  printf '1\n' >"$d/sysctl/kernel.panic_on_oops"
  printf '1\n' >"$d/sysctl/vm.overcommit_memory"
}

# The EC2 instance (and its VPC/subnet) standing for the node in LocalStack, so it can be a target.
node_instance() {
  [[ -f $NODE_DIR/instance ]] && return
  mkdir -p "$NODE_DIR"
  AWS_ENDPOINT_URL=http://127.0.0.1:$LOCALSTACK_PORT AWS_DEFAULT_REGION=us-east-1 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test \
    "$VENV_DIR/bin/python" - "$NODE_IP" >"$NODE_DIR/instance.tmp" <<'PY'
import sys, boto3
ec2 = boto3.client("ec2")
tags = lambda kind: [{"ResourceType": kind, "Tags": [{"Key": "Name", "Value": "cloudlb-rig-node"}]}]
vpc = ec2.create_vpc(CidrBlock="10.213.0.0/16", TagSpecifications=tags("vpc"))["Vpc"]["VpcId"]
sub = ec2.create_subnet(VpcId=vpc, CidrBlock="10.213.0.0/16", AvailabilityZone="us-east-1a",
                        TagSpecifications=tags("subnet"))["Subnet"]["SubnetId"]
inst = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, SubnetId=sub,
                         PrivateIpAddress=sys.argv[1], TagSpecifications=tags("instance"))["Instances"][0]["InstanceId"]
print(inst, vpc, sub)
PY
  mv "$NODE_DIR/instance.tmp" "$NODE_DIR/instance"
}

node_ready() {
  "$BIN_DIR/kubectl" --kubeconfig "$RIG_DIR/kubeconfig" get node "$NODE_NAME" \
    -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -qx True
}
containerd_ready() { ctr --address "$NODE_DIR/containerd/containerd.sock" version >/dev/null 2>&1; }

node_up() {
  node_images
  node_instance
  read -r NODE_INSTANCE NODE_VPC NODE_SUBNET <"$NODE_DIR/instance"
  node_configs
  ip netns list | awk '{print $1}' | grep -qxF "$RIG_NS_PREFIX$NODE_NS" || "$REPO_ROOT/dev/netns" add "$NODE_NS" "$NODE_IP" >/dev/null
  ip netns exec "$RIG_NS_PREFIX$NODE_NS" sysctl -qw net.ipv4.ip_forward=1
  # ClusterIPs need a route for a socket to connect at all (kube-proxy DNATs them before they leave);
  # no default route, so nothing outside the rig is reachable from the node or its pods.
  ip -n "$RIG_NS_PREFIX$NODE_NS" route replace 10.96.0.0/16 via "$HOST_IP"
  ip route replace "$POD_CIDR" via "$NODE_IP" dev "$RIG_BRIDGE"

  # host paths: create the missing ones (remembered for down) as tmpfs mount points
  : >"$NODE_DIR/created-host-paths"
  local p c
  for p in "${NODE_HOST_PATHS[@]}"; do
    # record every directory created on the way, deepest last, so down removes them deepest first
    local missing=() q=$p
    while [[ ! -e $q ]]; do missing=("$q" "${missing[@]}"); q=$(dirname "$q"); done
    for q in "${missing[@]}"; do mkdir "$q" && echo "$q" >>"$NODE_DIR/created-host-paths"; done
  done
  [[ -e /run/xtables.lock ]] || echo /run/xtables.lock >>"$NODE_DIR/created-host-paths"
  for c in "${NODE_CGROUP_CONTROLLERS[@]}"; do mkdir -p "$(node_cgroup "$c")"; done
  # cpuset children need their parent's cpus/mems
  cat /sys/fs/cgroup/cpuset/cpuset.cpus >"$(node_cgroup cpuset)/cpuset.cpus"
  cat /sys/fs/cgroup/cpuset/cpuset.mems >"$(node_cgroup cpuset)/cpuset.mems"

  START_BIN=$(command -v containerd) start node-containerd ip netns exec "$RIG_NS_PREFIX$NODE_NS" \
    "$REPO_ROOT/dev/kubelet-node-init" "$NODE_DIR" "$NODE_CGROUP" "${NODE_HOST_PATHS[*]}" \
    "$(command -v containerd)" --config "$NODE_DIR/containerd.toml"
  wait_for containerd 30 containerd_ready || { tail -20 "$RIG_DIR/logs/node-containerd.log" >&2; exit 1; }
  local cpid
  cpid=$(cut -d' ' -f1 "$PIDS/node-containerd.pid")
  local image
  for image in pause hello; do
    ctr --address "$NODE_DIR/containerd/containerd.sock" -n k8s.io images import "$RIG_IMAGES/$image.tar" >/dev/null
  done

  START_BIN=$BIN_DIR/kubelet start node-kubelet nsenter -t "$cpid" -m -n -- "$BIN_DIR/kubelet" \
    --config="$NODE_DIR/kubelet.yaml" --kubeconfig="$NODE_DIR/kubelet.kubeconfig" \
    --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" --root-dir="$NODE_DIR/kubelet" \
    --cert-dir="$NODE_DIR/kubelet/pki" --volume-plugin-dir="$NODE_DIR/volume-plugins" \
    --node-labels=cloudlb.io/rig-kubelet=true
  START_BIN=$BIN_DIR/kube-proxy start node-kube-proxy nsenter -t "$cpid" -m -n -- "$BIN_DIR/kube-proxy" \
    --config="$NODE_DIR/kube-proxy.yaml"
  wait_for "kubelet node Ready" 90 node_ready || { tail -30 "$RIG_DIR/logs/node-kubelet.log" >&2; exit 1; }
}

node_healthy() {
  for n in node-containerd node-kubelet node-kube-proxy kube-scheduler; do alive "$n" || return 1; done
  curl -sf --max-time 2 "http://$HOST_IP:$LOCALSTACK_PORT/_localstack/health" >/dev/null && node_ready
}

# Stops the node: kubelet and kube-proxy first (nothing restarts containers), then every process
# left in the node's cgroup (containers, shims, containerd), then its cgroups, namespace, route
# and the host paths it created.
node_down() {
  stop_one node-kube-proxy
  stop_one node-kubelet
  local c procs tries
  if [[ -d $(node_cgroup pids) ]]; then
    for tries in $(seq 1 50); do
      procs=$(find "$(node_cgroup pids)" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u)
      [[ -z $procs ]] && break
      # SIGKILL: containers already had their chance; the kernel's cgroup record says they are ours
      # shellcheck disable=SC2086
      kill -KILL $procs 2>/dev/null || true
      sleep 0.1
    done
  fi
  stop_one node-containerd
  for c in "${NODE_CGROUP_CONTROLLERS[@]}"; do
    [[ -d $(node_cgroup "$c") ]] && find "$(node_cgroup "$c")" -depth -type d -exec rmdir {} + 2>/dev/null
  done
  ip route del "$POD_CIDR" via "$NODE_IP" 2>/dev/null || true
  "$REPO_ROOT/dev/netns" del "$NODE_NS"
  if [[ -f $NODE_DIR/created-host-paths ]]; then
    tac "$NODE_DIR/created-host-paths" | while read -r p; do
      [[ -n $p ]] || continue
      if [[ -d $p ]]; then rm -rf --one-file-system "$p"; else rm -f "$p"; fi
    done
  fi
  # runc/containerd may leave mounts of the node's rootfs snapshots in the host's table when the
  # mount namespace was shared; unmount anything still under the node directory.
  if [[ -d $NODE_DIR ]]; then
    awk -v d="$NODE_DIR" '$2 ~ "^"d {print $2}' /proc/self/mounts | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  fi
}
