package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

const testUID = "0b7a3f52-9c1e-4d8a-a6f1-2e4c5d6b7a80"

// decisionFileOf is a decision file as the agent writes it: shop is enrolled, plain is not,
// istio-system holds the agent's own pods.
func decisionFileOf(pods map[string]any) map[string]any {
	return map[string]any{
		"version":             1,
		"exclude_namespaces":  []any{"kube-system", "infra"},
		"enrolled_namespaces": []any{"shop"},
		"agent_pods":          []any{map[string]any{"namespace": "istio-system", "name_prefix": "ztunnel-redirect-"}},
		"pods":                pods,
	}
}

func podEntry(namespace, name string, inMesh bool) map[string]any {
	return map[string]any{"namespace": namespace, "name": name, "in_mesh": inMesh}
}

// writeDecisionFile writes the file next to an absent agent socket, mode 0600, and returns the
// socket path.
func writeDecisionFile(t *testing.T, content any) string {
	t.Helper()
	dir := t.TempDir()
	data, ok := content.([]byte)
	if !ok {
		var err error
		if data, err = json.Marshal(content); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, decisionFileName), data, 0o600); err != nil {
		t.Fatal(err)
	}
	return filepath.Join(dir, "pluginevent.sock")
}

func podArgs(namespace, name, uid string) string {
	args := fmt.Sprintf("IgnoreUnknown=1;K8S_POD_NAMESPACE=%s;K8S_POD_NAME=%s", namespace, name)
	if uid != "" {
		args += ";K8S_POD_UID=" + uid
	}
	return args
}

// addWithoutAgent runs ADD for the pod with no agent listening on socket.
func addWithoutAgent(t *testing.T, socket, cniArgs string, env map[string]string) outcome {
	t.Helper()
	conf := netConfOf("1.0.0", map[string]any{"plugin_event_socket": socket})
	full := map[string]string{"CNI_ARGS": cniArgs}
	for k, v := range env {
		full[k] = v
	}
	return runWith(t, "ADD", conf, full)
}

func assertPasses(t *testing.T, o outcome) {
	t.Helper()
	want, _ := json.Marshal(prevResultOf("1.0.0"))
	var got, expected any
	_ = json.Unmarshal(want, &expected)
	if o.status != 0 || json.Unmarshal([]byte(o.out), &got) != nil || fmt.Sprint(got) != fmt.Sprint(expected) {
		t.Fatalf("expected the prevResult back, got %d %q (log: %s)", o.status, o.out, o.log)
	}
}

func assertFailsClosed(t *testing.T, o outcome, socket string, fragments ...string) {
	t.Helper()
	e := assertError(t, o, codeTryAgainLater, "1.0.0")
	msg := e["msg"].(string)
	for _, want := range append([]string{
		"ztunnel-redirect agent not reachable at " + socket,
		"is the ztunnel-redirect DaemonSet pod running on this node?",
	}, fragments...) {
		if !strings.Contains(msg, want) {
			t.Errorf("message %q lacks %q", msg, want)
		}
	}
	if !strings.Contains(e["details"].(string), "connect") {
		t.Errorf("details %q do not say why the agent was unreachable", e["details"])
	}
}

// --- The decision table, one test per row, with no agent listening -------------------------

func TestWithoutAgentExcludedNamespacePasses(t *testing.T) {
	file := decisionFileOf(map[string]any{testUID: podEntry("infra", "x", true)})
	// Excluded by the plugin's own config: known without the file.
	assertPasses(t, addWithoutAgent(t, absentSocket(t), podArgs("kube-system", "coredns-1", ""), nil))
	// Excluded by the agent's settings, as the file says (and a stale in-mesh entry is ignored).
	assertPasses(t, addWithoutAgent(t, writeDecisionFile(t, file), podArgs("infra", "x", testUID), nil))
}

func TestWithoutAgentHostNetworkPasses(t *testing.T) {
	// The netns is the host's own (the plugin runs in it), with or without a decision file.
	env := map[string]string{"CNI_NETNS": fmt.Sprintf("/proc/%d/ns/net", os.Getpid())}
	assertPasses(t, addWithoutAgent(t, absentSocket(t), podArgs("shop", "web-0", ""), env))
	file := decisionFileOf(map[string]any{testUID: podEntry("shop", "web-0", true)})
	assertPasses(t, addWithoutAgent(t, writeDecisionFile(t, file), podArgs("shop", "web-0", testUID), env))
}

func TestWithoutAgentTheAgentsOwnPodPasses(t *testing.T) {
	socket := writeDecisionFile(t, decisionFileOf(map[string]any{}))
	assertPasses(t, addWithoutAgent(t, socket, podArgs("istio-system", "ztunnel-redirect-x7k2p", testUID), nil))
	// Only in the agent's namespace, and the prefix alone is not a pod name.
	o := addWithoutAgent(t, socket, podArgs("istio-system", "ztunnel-redirect-", ""), nil)
	if o.status != 0 {
		t.Errorf("the bare prefix in a namespace not enrolled still passes as unknown: %q", o.out)
	}
	assertFailsClosed(t, addWithoutAgent(t, socket, podArgs("shop", "ztunnel-redirect-x7k2p", ""), nil), socket, "shop/ztunnel-redirect-x7k2p")
}

func TestWithoutAgentPodKnownInMeshFailsClosed(t *testing.T) {
	socket := writeDecisionFile(t, decisionFileOf(map[string]any{testUID: podEntry("plain", "web-0", true)}))
	assertFailsClosed(t, addWithoutAgent(t, socket, podArgs("plain", "web-0", testUID), nil), socket,
		"pod plain/web-0 is in the ambient mesh")
	// Without a UID in CNI_ARGS, by namespace and name.
	assertFailsClosed(t, addWithoutAgent(t, socket, podArgs("plain", "web-0", ""), nil), socket,
		"pod plain/web-0 is in the ambient mesh")
}

func TestWithoutAgentPodKnownNotInMeshPasses(t *testing.T) {
	socket := writeDecisionFile(t, decisionFileOf(map[string]any{testUID: podEntry("shop", "web-0", false)}))
	assertPasses(t, addWithoutAgent(t, socket, podArgs("shop", "web-0", testUID), nil))
	assertPasses(t, addWithoutAgent(t, socket, podArgs("shop", "web-0", ""), nil))
}

func TestWithoutAgentUnknownPodInEnrolledNamespaceFailsClosed(t *testing.T) {
	// The file knows a namesake under another UID (a recreated StatefulSet pod): still unknown.
	socket := writeDecisionFile(t, decisionFileOf(map[string]any{"other-uid": podEntry("shop", "web-0", false)}))
	assertFailsClosed(t, addWithoutAgent(t, socket, podArgs("shop", "web-0", testUID), nil), socket,
		"pod shop/web-0 is not known to the agent yet and its namespace shop is in the ambient mesh")
	assertFailsClosed(t, addWithoutAgent(t, socket, podArgs("shop", "web-1", ""), nil), socket, "shop/web-1")
}

func TestWithoutAgentUnknownPodInNamespaceNotEnrolledPasses(t *testing.T) {
	socket := writeDecisionFile(t, decisionFileOf(map[string]any{}))
	assertPasses(t, addWithoutAgent(t, socket, podArgs("plain", "web-0", testUID), nil))
	assertPasses(t, addWithoutAgent(t, socket, podArgs("plain", "web-0", ""), nil))
}

func TestWithoutAgentNoOrUnreadableFileFailsClosed(t *testing.T) {
	valid := decisionFileOf(map[string]any{})
	cases := map[string]any{
		"not JSON":            []byte("{"),
		"not an object":       []byte("[]"),
		"future version":      mapWith(valid, "version", 2),
		"no version":          mapWithout(valid, "version"),
		"no pods":             mapWithout(valid, "pods"),
		"no enrolled list":    mapWithout(valid, "enrolled_namespaces"),
		"pods of wrong type":  mapWith(valid, "pods", []any{}),
		"pod without in_mesh": mapWith(valid, "pods", map[string]any{testUID: map[string]any{"namespace": "plain", "name": "web-0"}}),
		"empty name prefix":   mapWith(valid, "agent_pods", []any{map[string]any{"namespace": "istio-system", "name_prefix": ""}}),
	}
	for name, content := range cases {
		t.Run(name, func(t *testing.T) {
			socket := writeDecisionFile(t, content)
			assertFailsClosed(t, addWithoutAgent(t, socket, podArgs("plain", "web-0", testUID), nil), socket,
				"cannot tell whether pod plain/web-0 is in the ambient mesh")
		})
	}
	t.Run("no file", func(t *testing.T) {
		socket := absentSocket(t)
		assertFailsClosed(t, addWithoutAgent(t, socket, podArgs("plain", "web-0", ""), nil), socket,
			"cannot tell whether pod plain/web-0 is in the ambient mesh", decisionFileName)
	})
	t.Run("writable by others", func(t *testing.T) {
		socket := writeDecisionFile(t, valid)
		path := filepath.Join(filepath.Dir(socket), decisionFileName)
		if err := os.Chmod(path, 0o666); err != nil {
			t.Fatal(err)
		}
		assertFailsClosed(t, addWithoutAgent(t, socket, podArgs("plain", "web-0", ""), nil), socket, "writable by group or others")
	})
	t.Run("a symlink", func(t *testing.T) {
		socket := writeDecisionFile(t, valid)
		dir := filepath.Dir(socket)
		link := filepath.Join(t.TempDir(), "pluginevent.sock")
		if err := os.Symlink(filepath.Join(dir, decisionFileName), filepath.Join(filepath.Dir(link), decisionFileName)); err != nil {
			t.Fatal(err)
		}
		assertFailsClosed(t, addWithoutAgent(t, link, podArgs("plain", "web-0", ""), nil), link)
	})
	t.Run("a FIFO", func(t *testing.T) {
		dir := t.TempDir()
		if err := syscall.Mkfifo(filepath.Join(dir, decisionFileName), 0o600); err != nil {
			t.Fatal(err)
		}
		socket := filepath.Join(dir, "pluginevent.sock")
		assertFailsClosed(t, addWithoutAgent(t, socket, podArgs("plain", "web-0", ""), nil), socket, "not a regular file")
	})
	t.Run("excluded namespaces still pass", func(t *testing.T) {
		assertPasses(t, addWithoutAgent(t, absentSocket(t), podArgs("kube-system", "x", ""), nil))
	})
}

func mapWith(m map[string]any, key string, value any) map[string]any {
	out := map[string]any{}
	for k, v := range m {
		out[k] = v
	}
	out[key] = value
	return out
}

func mapWithout(m map[string]any, key string) map[string]any {
	out := mapWith(m, key, nil)
	delete(out, key)
	return out
}

// --- The pure decision, for the combinations the table leaves implicit -----------------------

func TestDecideWithoutAgentOrder(t *testing.T) {
	yes, no := true, false
	file := &decisions{
		Version: 1, ExcludeNamespaces: []string{"infra"}, EnrolledNamespaces: []string{"shop", "istio-system"},
		AgentPods: []agentPodSelector{{"istio-system", "ztunnel-redirect-"}},
		Pods: map[string]podDecision{
			"u-in":  {"shop", "a", &yes},
			"u-out": {"shop", "b", &no},
			"u-old": {"shop", "b", &yes}, // a namesake in the mesh
			"u-ag":  {"istio-system", "ztunnel-redirect-abcde", &yes},
		},
	}
	cases := []struct {
		pod   podRef
		host  bool
		file  *decisions
		pass  bool
		about string
	}{
		{podRef{"kube-system", "x", ""}, false, nil, true, "excluded by config, no file"},
		{podRef{"shop", "a", "u-in"}, true, file, true, "host network beats a known in-mesh entry"},
		{podRef{"infra", "a", "u-in"}, false, file, true, "excluded by file"},
		{podRef{"istio-system", "ztunnel-redirect-abcde", "u-ag"}, false, file, true, "agent pod beats its entry"},
		{podRef{"shop", "a", "u-in"}, false, file, false, "known in mesh"},
		{podRef{"shop", "b", "u-out"}, false, file, true, "known not in mesh by UID"},
		{podRef{"shop", "b", ""}, false, file, false, "by name: any namesake in the mesh wins"},
		{podRef{"shop", "c", "u-new"}, false, file, false, "unknown, enrolled"},
		{podRef{"plain", "c", "u-new"}, false, file, true, "unknown, not enrolled"},
		{podRef{"shop", "c", ""}, false, nil, false, "no file"},
	}
	for _, c := range cases {
		v := decideWithoutAgent(c.pod, []string{"kube-system"}, c.host, c.file, os.ErrNotExist)
		if v.pass != c.pass || v.why == "" {
			t.Errorf("%s: %+v", c.about, v)
		}
	}
}
