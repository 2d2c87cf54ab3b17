package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"syscall"
)

// decisionFileName is the agent's decision file, in its run directory (next to its socket).
const decisionFileName = "cni-decisions.json"

// decisionFileVersion is the format this plugin reads; a file of another version is unreadable.
const decisionFileVersion = 1

// maxDecisionFile caps the file: a node's pods take a few hundred bytes each.
const maxDecisionFile = 16 << 20

// decisions is the agent's decision file (README.md, "The decision file").
type decisions struct {
	Version            int                    `json:"version"`
	ExcludeNamespaces  []string               `json:"exclude_namespaces"`
	EnrolledNamespaces []string               `json:"enrolled_namespaces"`
	AgentPods          []agentPodSelector     `json:"agent_pods"`
	Pods               map[string]podDecision `json:"pods"`
}

// agentPodSelector recognises the agent's own pods by what the runtime passes: their namespace
// and the start of their name (a DaemonSet's pods are `<daemonset name>-<suffix>`).
type agentPodSelector struct {
	Namespace  string `json:"namespace"`
	NamePrefix string `json:"name_prefix"`
}

// podDecision is the agent's decision for one pod of this node, keyed by pod UID.
type podDecision struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	InMesh    *bool  `json:"in_mesh"`
}

// loadDecisions reads and checks the decision file. It must be a regular file owned by our own
// user (root on a node) and writable by no one else: whoever can write it decides which pods
// start without redirection.
func loadDecisions(path string) (*decisions, error) {
	// O_NONBLOCK: a FIFO in its place must not hang the pod's creation.
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !info.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file", path)
	}
	if st, ok := info.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Geteuid() {
		return nil, fmt.Errorf("%s is owned by uid %d, not %d", path, st.Uid, os.Geteuid())
	}
	if info.Mode().Perm()&0o022 != 0 {
		return nil, fmt.Errorf("%s is writable by group or others (mode %#o)", path, info.Mode().Perm())
	}
	data, err := io.ReadAll(io.LimitReader(f, maxDecisionFile+1))
	if err != nil {
		return nil, err
	}
	if len(data) > maxDecisionFile {
		return nil, fmt.Errorf("%s is larger than %d bytes", path, maxDecisionFile)
	}
	return parseDecisions(data)
}

func parseDecisions(data []byte) (*decisions, error) {
	var d decisions
	if err := json.Unmarshal(data, &d); err != nil {
		return nil, fmt.Errorf("not a decision file: %v", err)
	}
	if d.Version != decisionFileVersion {
		return nil, fmt.Errorf("decision file version %d, this plugin reads version %d",
			d.Version, decisionFileVersion)
	}
	if d.ExcludeNamespaces == nil || d.EnrolledNamespaces == nil || d.AgentPods == nil || d.Pods == nil {
		return nil, errors.New(
			"decision file lacks one of exclude_namespaces, enrolled_namespaces, agent_pods, pods")
	}
	for _, selector := range d.AgentPods {
		if selector.Namespace == "" || selector.NamePrefix == "" {
			return nil, errors.New("decision file: an agent_pods entry needs a namespace and a name_prefix")
		}
	}
	for uid, pod := range d.Pods {
		if pod.InMesh == nil || pod.Namespace == "" || pod.Name == "" {
			return nil, fmt.Errorf("decision file: pod %q needs namespace, name and in_mesh", uid)
		}
	}
	return &d, nil
}

// podRef is the pod as the runtime names it in CNI_ARGS; uid is empty when it passes none.
type podRef struct {
	namespace, name, uid string
}

func (p podRef) String() string { return p.namespace + "/" + p.name }

// verdict is the plugin's own decision when the agent does not answer.
type verdict struct {
	pass bool
	// why says which row of the decision table applied, for the log or the error message.
	why string
}

// decideWithoutAgent is the decision table of README.md, first row that applies: excludedByConf
// comes from the plugin's own config (known without the file), hostNetwork from the pod's netns,
// file and fileErr from loadDecisions.
func decideWithoutAgent(
	pod podRef, excludedByConf []string, hostNetwork bool, file *decisions, fileErr error,
) verdict {
	switch {
	case contains(excludedByConf, pod.namespace):
		return verdict{true, fmt.Sprintf("namespace %s is excluded", pod.namespace)}
	case hostNetwork:
		return verdict{true, "its netns is the host's (host network): nothing to redirect"}
	case file == nil:
		return verdict{false, fmt.Sprintf(
			"cannot tell whether pod %s is in the ambient mesh: %v", pod, fileErr)}
	case contains(file.ExcludeNamespaces, pod.namespace):
		return verdict{true, fmt.Sprintf("namespace %s is excluded", pod.namespace)}
	case file.isAgentPod(pod):
		return verdict{true, "it is the agent's own pod"}
	}
	switch inMesh, known := file.lookup(pod); {
	case known && inMesh:
		return verdict{false, fmt.Sprintf("pod %s is in the ambient mesh", pod)}
	case known:
		return verdict{true, "the agent decided it is not in the mesh"}
	case contains(file.EnrolledNamespaces, pod.namespace):
		return verdict{false, fmt.Sprintf(
			"pod %s is not known to the agent yet and its namespace %s is in the ambient mesh",
			pod, pod.namespace)}
	}
	return verdict{true, fmt.Sprintf(
		"unknown to the agent and namespace %s is not enrolled (the agent enrolls a pod that opts "+
			"in by its own label when it is back)", pod.namespace)}
}

func (d *decisions) isAgentPod(pod podRef) bool {
	for _, s := range d.AgentPods {
		named := len(pod.name) > len(s.NamePrefix) && strings.HasPrefix(pod.name, s.NamePrefix)
		if s.Namespace == pod.namespace && named {
			return true
		}
	}
	return false
}

// lookup finds the agent's decision for the pod: by UID when the runtime passed one (a pod
// recreated under the same name is another pod), else by namespace and name, where any entry
// in the mesh wins (two entries of one name: a deleted pod and its successor).
func (d *decisions) lookup(pod podRef) (inMesh, known bool) {
	if pod.uid != "" {
		entry, ok := d.Pods[pod.uid]
		return ok && *entry.InMesh, ok
	}
	for _, entry := range d.Pods {
		if entry.Namespace == pod.namespace && entry.Name == pod.name {
			known = true
			inMesh = inMesh || *entry.InMesh
		}
	}
	return inMesh, known
}

func contains(list []string, s string) bool {
	for _, item := range list {
		if item == s {
			return true
		}
	}
	return false
}
