package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"strings"
)

// maxStdin caps the network config read from stdin. A real one (a plugin's config and the
// primary's result) is a few kilobytes; anything near this is not a network config.
const maxStdin = 1 << 20

// defaultEventSocket is the agent's socket when the config does not name one.
const defaultEventSocket = "/var/run/istio-cni/pluginevent.sock"

// defaultExcludeNamespaces applies when the config does not list the excluded namespaces.
var defaultExcludeNamespaces = []string{"kube-system"}

// netConf is the network configuration read from stdin, with the keys we read checked. Other
// keys (those of older versions of this plugin included) are ignored, as CNI plugins do.
type netConf struct {
	cniVersion string
	// prevResult is the primary plugin's result as it came, nil when absent or null.
	prevResult json.RawMessage
	// eventSocket is the agent's `POST /cmdadd` socket; the decision file is next to it.
	eventSocket       string
	logLevel          string
	excludeNamespaces []string
}

// readStdin reads the network config, at most maxStdin bytes.
func readStdin(r io.Reader) ([]byte, *pluginError) {
	data, err := io.ReadAll(io.LimitReader(r, maxStdin+1))
	if err != nil {
		return nil, &pluginError{codeIOFailure, "cannot read the network config from stdin", err.Error()}
	}
	if len(data) > maxStdin {
		return nil, &pluginError{
			codeInvalidConfig,
			fmt.Sprintf("invalid network config: larger than %d bytes", maxStdin),
			"",
		}
	}
	return data, nil
}

// loadConf decodes the network config as a JSON object, its values left undecoded.
func loadConf(data []byte, readErr *pluginError) (map[string]json.RawMessage, *pluginError) {
	if readErr != nil {
		return nil, readErr
	}
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(data, &raw); err != nil {
		if _, isType := err.(*json.UnmarshalTypeError); isType {
			return nil, &pluginError{codeInvalidConfig, "invalid network config: not a JSON object", ""}
		}
		return nil, &pluginError{codeInvalidConfig, "invalid network config: stdin is not JSON", err.Error()}
	}
	if raw == nil { // the JSON was `null`
		return nil, &pluginError{codeInvalidConfig, "invalid network config: not a JSON object", ""}
	}
	return raw, nil
}

func parseNetConf(raw map[string]json.RawMessage) (*netConf, *pluginError) {
	conf := &netConf{}
	var err *pluginError
	if conf.cniVersion, err = stringField(raw, "cniVersion", ""); err != nil {
		return nil, err
	}
	if _, err = stringField(raw, "name", ""); err != nil {
		return nil, err
	}
	if prev, ok := raw["prevResult"]; ok && !isNull(prev) {
		if !isObject(prev) {
			return nil, invalidConfig("prevResult is not an object")
		}
		conf.prevResult = prev
	}
	if conf.eventSocket, err = stringField(raw, "plugin_event_socket", defaultEventSocket); err != nil {
		return nil, err
	}
	if conf.logLevel, err = stringField(raw, "log_level", "info"); err != nil {
		return nil, err
	}
	conf.excludeNamespaces = defaultExcludeNamespaces
	if value, ok := raw["exclude_namespaces"]; ok {
		names, ok := stringList(value)
		if !ok {
			return nil, invalidConfig("exclude_namespaces must be a list of strings")
		}
		conf.excludeNamespaces = names
	}
	return conf, nil
}

func invalidConfig(problem string) *pluginError {
	return &pluginError{codeInvalidConfig, "invalid network config: " + problem, ""}
}

func stringField(raw map[string]json.RawMessage, key, fallback string) (string, *pluginError) {
	value, ok := raw[key]
	if !ok {
		return fallback, nil
	}
	s, ok := jsonString(value)
	if !ok {
		return "", invalidConfig(key + " must be a string")
	}
	return s, nil
}

// jsonString decodes a JSON string; false for anything else, null included.
func jsonString(value json.RawMessage) (string, bool) {
	var s string
	if !bytes.HasPrefix(bytes.TrimSpace(value), []byte(`"`)) || json.Unmarshal(value, &s) != nil {
		return "", false
	}
	return s, true
}

// stringList decodes a JSON list of strings; false for anything else (a null element included).
func stringList(value json.RawMessage) ([]string, bool) {
	var items []json.RawMessage
	if !bytes.HasPrefix(bytes.TrimSpace(value), []byte("[")) || json.Unmarshal(value, &items) != nil {
		return nil, false
	}
	out := make([]string, 0, len(items))
	for _, item := range items {
		s, ok := jsonString(item)
		if !ok {
			return nil, false
		}
		out = append(out, s)
	}
	return out, true
}

func isNull(value json.RawMessage) bool { return bytes.Equal(bytes.TrimSpace(value), []byte("null")) }

func isObject(value json.RawMessage) bool {
	return bytes.HasPrefix(bytes.TrimSpace(value), []byte("{"))
}

// parseCNIArgs turns `K8S_POD_NAME=a;K8S_POD_NAMESPACE=b;IgnoreUnknown=1` into a map.
func parseCNIArgs(value string) map[string]string {
	args := map[string]string{}
	for _, item := range strings.Split(value, ";") {
		key, val, ok := strings.Cut(item, "=")
		if key = strings.TrimSpace(key); ok && key != "" {
			args[key] = strings.TrimSpace(val)
		}
	}
	return args
}

// podIPs returns the addresses of `prevResult.ips[].address` (CIDR form from CNI 0.3 on), prefix
// stripped; none without a prevResult.
func podIPs(prevResult json.RawMessage) ([]string, *pluginError) {
	out := []string{}
	if prevResult == nil {
		return out, nil
	}
	var prev struct {
		IPs json.RawMessage `json:"ips"`
	}
	if err := json.Unmarshal(prevResult, &prev); err != nil {
		return nil, invalidConfig("prevResult: " + err.Error())
	}
	if prev.IPs == nil || isNull(prev.IPs) {
		return out, nil
	}
	var entries []json.RawMessage
	if !bytes.HasPrefix(bytes.TrimSpace(prev.IPs), []byte("[")) || json.Unmarshal(prev.IPs, &entries) != nil {
		return nil, invalidConfig("prevResult.ips is not a list")
	}
	for _, entry := range entries {
		var fields map[string]json.RawMessage
		if !isObject(entry) || json.Unmarshal(entry, &fields) != nil {
			return nil, invalidConfig("prevResult.ips entry " + string(entry))
		}
		address, ok := jsonString(fields["address"])
		if !ok {
			return nil, invalidConfig("prevResult.ips entry " + string(entry))
		}
		ip, ok := parseAddress(address)
		if !ok {
			return nil, invalidConfig(fmt.Sprintf("bad address %q", address))
		}
		out = append(out, ip.String())
	}
	return out, nil
}

// parseAddress takes an address in CIDR form ("10.244.1.7/24") or bare.
func parseAddress(text string) (netip.Addr, bool) {
	if prefix, err := netip.ParsePrefix(text); err == nil {
		return prefix.Addr(), true
	}
	addr, err := netip.ParseAddr(text)
	return addr, err == nil
}

// result is what a successful ADD prints: prevResult unchanged (libcni reads the result's version
// from the result itself, so it gets the request's when it has none), or, without a prevResult
// (attached standalone, e.g. by Multus), an empty result in the request's version.
func result(conf *netConf) string {
	if conf.prevResult == nil {
		return mustMarshal(map[string]string{"cniVersion": conf.cniVersion})
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(conf.prevResult, &fields); err != nil {
		panic(err) // parseNetConf decoded it as part of the config already
	}
	if _, ok := fields["cniVersion"]; !ok {
		fields["cniVersion"] = json.RawMessage(mustMarshal(conf.cniVersion))
		return mustMarshal(fields)
	}
	var compact bytes.Buffer
	if err := json.Compact(&compact, conf.prevResult); err != nil {
		panic(err) // valid JSON, see above
	}
	return compact.String()
}
