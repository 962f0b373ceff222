// Go's text/template, and Ollama's way of running a TEMPLATE over a conversation, as the oracle
// for qvl's runtime/go_template.py and runtime/ollama_template.py
// (scripts/build_go_template_cases.py runs it: go run main.go < cases.json > outputs.json).
//
// Each case: {"template": text, "data": any} (run as it is) or {"template": text, "messages":
// [{"role", "content"}]} (run as Ollama's template.Execute runs a chat: .Messages and .System
// for a template that reads .Messages, else a run per turn, the last cut after .Response).
// Each output: {"out": text} or {"error": text}.
package main

import (
	"bytes"
	"encoding/json"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
)

type Message struct {
	Role      string `json:"role"`
	Content   string `json:"content"`
	Images    []any
	ToolCalls []any
	Thinking  string
}

type Case struct {
	Template string     `json:"template"`
	Data     any        `json:"data"`
	Messages []*Message `json:"messages"`
}

var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
}

// vars: every field name the template reads, lowercased (as Ollama's Template.Vars)
func vars(n parse.Node, found map[string]bool) {
	switch t := n.(type) {
	case *parse.ListNode:
		if t == nil {
			return
		}
		for _, c := range t.Nodes {
			vars(c, found)
		}
	case *parse.ActionNode:
		vars(t.Pipe, found)
	case *parse.IfNode:
		vars(&t.BranchNode, found)
	case *parse.RangeNode:
		vars(&t.BranchNode, found)
	case *parse.WithNode:
		vars(&t.BranchNode, found)
	case *parse.BranchNode:
		vars(t.Pipe, found)
		vars(t.List, found)
		if t.ElseList != nil {
			vars(t.ElseList, found)
		}
	case *parse.PipeNode:
		if t == nil {
			return
		}
		for _, c := range t.Cmds {
			for _, a := range c.Args {
				vars(a, found)
			}
		}
	case *parse.FieldNode:
		for _, s := range t.Ident {
			found[strings.ToLower(s)] = true
		}
	case *parse.VariableNode:
		for _, s := range t.Ident[1:] {
			found[strings.ToLower(s)] = true
		}
	case *parse.ChainNode:
		vars(t.Node, found)
		for _, s := range t.Field {
			found[strings.ToLower(s)] = true
		}
	}
}

func contains(xs []string, x string) bool {
	for _, y := range xs {
		if y == x {
			return true
		}
	}
	return false
}

// cut: the nodes after the first .Response field deleted (Ollama's deleteNode)
func cut(n parse.Node, done *bool) parse.Node {
	fn := func(n parse.Node) bool {
		if f, ok := n.(*parse.FieldNode); ok && contains(f.Ident, "Response") {
			*done = true
			return false
		}
		return *done
	}
	var walk func(n parse.Node) parse.Node
	walk = func(n parse.Node) parse.Node {
		if fn(n) {
			return nil
		}
		switch t := n.(type) {
		case *parse.ListNode:
			var nodes []parse.Node
			for _, c := range t.Nodes {
				if n := walk(c); n != nil {
					nodes = append(nodes, n)
				}
			}
			t.Nodes = nodes
			return t
		case *parse.IfNode:
			t.BranchNode = *(walk(&t.BranchNode).(*parse.BranchNode))
		case *parse.WithNode:
			t.BranchNode = *(walk(&t.BranchNode).(*parse.BranchNode))
		case *parse.RangeNode:
			t.BranchNode = *(walk(&t.BranchNode).(*parse.BranchNode))
		case *parse.BranchNode:
			t.List = walk(t.List).(*parse.ListNode)
			if t.ElseList != nil {
				t.ElseList = walk(t.ElseList).(*parse.ListNode)
			}
		case *parse.ActionNode:
			n := walk(t.Pipe)
			if n == nil {
				return nil
			}
			t.Pipe = n.(*parse.PipeNode)
		case *parse.PipeNode:
			var commands []*parse.CommandNode
			for _, c := range t.Cmds {
				var args []parse.Node
				for _, a := range c.Args {
					if n := walk(a); n != nil {
						args = append(args, n)
					}
				}
				if len(args) == 0 {
					return nil
				}
				c.Args = args
				commands = append(commands, c)
			}
			if len(commands) == 0 {
				return nil
			}
			t.Cmds = commands
		}
		return n
	}
	return walk(n)
}

func chat(tmpl *template.Template, msgs []*Message) (string, error) {
	var system []string
	var collated []*Message
	for _, m := range msgs {
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == m.Role && m.Role != "tool" {
			collated[len(collated)-1].Content += "\n\n" + m.Content
		} else {
			c := *m
			collated = append(collated, &c)
		}
	}
	found := map[string]bool{}
	vars(tmpl.Root, found)
	var b bytes.Buffer
	if found["messages"] {
		err := tmpl.Execute(&b, map[string]any{"System": strings.Join(system, "\n\n"), "Messages": collated,
			"Tools": nil, "Response": "", "Think": false, "IsThinkSet": false})
		return b.String(), err
	}
	var sys, prompt, response string
	execute := func() error {
		err := tmpl.Execute(&b, map[string]any{"System": sys, "Prompt": prompt, "Response": response})
		sys, prompt, response = "", "", ""
		return err
	}
	for _, m := range collated {
		switch m.Role {
		case "system":
			if prompt != "" || response != "" {
				if err := execute(); err != nil {
					return "", err
				}
			}
			sys = m.Content
		case "user":
			if response != "" {
				if err := execute(); err != nil {
					return "", err
				}
			}
			prompt = m.Content
		case "assistant":
			response = m.Content
		}
	}
	done := false
	nodes := cut(tmpl.Root.Copy(), &done)
	tree := parse.Tree{Root: nodes.(*parse.ListNode)}
	last := template.Must(template.New("").Funcs(funcs).AddParseTree("", &tree))
	err := last.Execute(&b, map[string]any{"System": sys, "Prompt": prompt, "Response": response})
	return b.String(), err
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	var outs []map[string]string
	for _, c := range cases {
		tmpl, err := template.New("").Funcs(funcs).Parse(c.Template)
		var out string
		if err == nil {
			if c.Messages != nil {
				out, err = chat(tmpl, c.Messages)
			} else {
				var b bytes.Buffer
				err = tmpl.Execute(&b, c.Data)
				out = b.String()
			}
		}
		if err != nil {
			outs = append(outs, map[string]string{"error": err.Error()})
		} else {
			outs = append(outs, map[string]string{"out": out})
		}
	}
	json.NewEncoder(os.Stdout).Encode(outs)
}
