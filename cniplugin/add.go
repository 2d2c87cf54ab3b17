package main

import (
	"path/filepath"
	"syscall"
)

// ownNetns is the plugin's own network namespace: the runtime runs it in the host's.
const ownNetns = "/proc/self/ns/net"

// cmdAdd hands the pod to the agent and returns what to print on success: the prevResult.
//
// A sandbox that is not a Kubernetes pod (no K8S_POD_NAME/K8S_POD_NAMESPACE) and a pod of an
// excluded namespace pass without asking the agent. When the agent does not answer, the decision
// file decides (decideWithoutAgent); when it answers anything but 200, the ADD fails with its
// message.
func cmdAdd(conf *netConf, env map[string]string, log *logger) (string, *pluginError) {
	args := parseCNIArgs(env["CNI_ARGS"])
	pod := podRef{namespace: args["K8S_POD_NAMESPACE"], name: args["K8S_POD_NAME"], uid: args["K8S_POD_UID"]}
	if pod.name == "" || pod.namespace == "" {
		log.infof("not a Kubernetes pod (no K8S_POD_NAME/K8S_POD_NAMESPACE): passing through")
		return result(conf), nil
	}
	if contains(conf.excludeNamespaces, pod.namespace) {
		log.debugf("pod %s is in an excluded namespace: passing through", pod)
		return result(conf), nil
	}
	netns := env["CNI_NETNS"]
	if netns == "" {
		return "", &pluginError{codeInvalidEnvironment, "missing environment variable CNI_NETNS", ""}
	}
	ips, perr := podIPs(conf.prevResult)
	if perr != nil {
		return "", perr
	}
	// containerd and CRI-O pass the UID: it tells a recreated pod from its namesake (StatefulSet).
	event := &addEvent{
		Netns: netns, PodName: pod.name, PodNamespace: pod.namespace, IPs: newPodIPs(ips), PodUID: pod.uid,
	}
	switch err := postAddEvent(conf.eventSocket, event, agentTimeout).(type) {
	case nil:
		// At debug: the agent logs the ADD itself, and an info line here would cost every pod
		// start a second request to the agent just to echo it back.
		log.debugf("pod %s handed to the agent (netns %s)", pod, netns)
		return result(conf), nil
	case *unreachableError:
		log.warnf("agent unreachable at %s: %v", conf.eventSocket, err)
		return withoutAgent(conf, pod, netns, err, log)
	case *pluginError:
		return "", err
	default:
		panic(err) // postAddEvent returns no other kind
	}
}

// withoutAgent decides from the decision file next to the agent's socket.
func withoutAgent(conf *netConf, pod podRef, netns string, why error, log *logger) (string, *pluginError) {
	path := filepath.Join(filepath.Dir(conf.eventSocket), decisionFileName)
	file, fileErr := loadDecisions(path)
	if fileErr != nil {
		log.warnf("decision file unusable: %v", fileErr)
	}
	v := decideWithoutAgent(pod, conf.excludeNamespaces, sameNetns(netns, ownNetns), file, fileErr)
	if v.pass {
		log.infof("pod %s passes without the agent: %s", pod, v.why)
		return result(conf), nil
	}
	return "", &pluginError{
		codeTryAgainLater,
		"ztunnel-redirect agent not reachable at " + conf.eventSocket +
			": is the ztunnel-redirect DaemonSet pod running on this node? (" + v.why + ")",
		why.Error(),
	}
}

// sameNetns tells whether two paths name one network namespace (same device and inode); false
// when either cannot be read.
func sameNetns(a, b string) bool {
	var sa, sb syscall.Stat_t
	if syscall.Stat(a, &sa) != nil || syscall.Stat(b, &sb) != nil {
		return false
	}
	return sa.Dev == sb.Dev && sa.Ino == sb.Ino
}
